"""Check an NVFP4 checkpoint, ours or not: ``nvfp4cal-verify DIR`` (or ``python -m nvfp4cal.cli.verify DIR``);
from Python ``nvfp4cal.verify(DIR)``.

What is checked: :mod:`nvfp4cal.checkpoint.check` (the same check every export runs before its rename).
Prints a short table and exits 1 on any problem, 2 on a usage error.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint.check import Verdict, verify

__all__ = ["Verdict", "cli", "main", "verify"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: nvfp4cal-verify CHECKPOINT_DIR", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_dir():
        print(f"nvfp4cal-verify: error: {argv[0]} is not a directory", file=sys.stderr)
        return 2
    verdict = verify(argv[0])
    print(f"{argv[0]}: {'OK' if verdict.ok else 'PROBLEMS'}")
    print(verdict.table())
    return 0 if verdict.ok else 1


def cli() -> None:
    """Console-script entry point: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
