"""The ``qmpc`` command line.

qmpc check [--full]      sensitivity checks of this installation, as a pass/fail table
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_check(args: argparse.Namespace) -> int:
    import casadi
    import torch

    from qmpc.check import format_table, run_checks

    print(f"qmpc check: casadi {casadi.__version__}, torch {torch.__version__}, {'full' if args.full else 'quick'} run")
    t0 = time.perf_counter()
    rows = []
    for row in run_checks(quick=not args.full):
        rows.append(row)
        if args.verbose:
            print(f"  {row.name}: {row.error:.2e}", flush=True)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpc", description="MPC with a learned Q-function as the cost-to-go.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check solver sensitivities on this installation (pass/fail table)")
    c.add_argument("--full", action="store_true", help="every network x bounds x horizon x solver plugin")
    c.add_argument("-v", "--verbose", action="store_true", help="print each check as it finishes")
    c.set_defaults(func=_cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
