"""Command line: `python -m persona_kernels <command>` (also installed as `persona-kernels`)."""
from __future__ import annotations

import argparse
import sys


def _cmd_env(args) -> int:
    from .backends import report

    print(report())
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    run(args.out, backend=args.backend)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="persona-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="print library versions and which backends run on this machine")
    p.set_defaults(func=_cmd_env)
    p = sub.add_parser("demo", help="run the pipeline on the built-in model and personas")
    p.add_argument("--out", default="reports/demo", help="report directory (default: reports/demo)")
    p.add_argument("--backend", default="auto", help="accumulate_stats backend (default: auto)")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
