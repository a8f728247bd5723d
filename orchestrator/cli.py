"""The `longview` command line.

Subcommands grow with the orchestrator; for now:
    longview ring-demo [--seq N --worlds 1 2 4]   ring attention across local processes
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="longview", description="long-context training on Ray Train")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("ring-demo", help="ring attention across local gloo processes: exactness and throughput",
                   add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command == "ring-demo":
        from parallelism.demo import main as ring_demo  # noqa: PLC0415

        ring_demo(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
