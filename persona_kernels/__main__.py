"""`python -m persona_kernels <command>`: see persona_kernels/app/cli.py."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
