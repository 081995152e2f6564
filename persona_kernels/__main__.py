"""`python -m persona_kernels <command>`: see persona_kernels/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
