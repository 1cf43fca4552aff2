"""`python -m bench [--quick] --out DIR [--section KEY ...]`: the benchmark suite (same as `vmr bench`)."""
from __future__ import annotations

import argparse
import os
import pickle
import sys


def main(argv: list[str] | None = None) -> int:
    from bench.suite import SECTIONS, run_section, run_suite

    keys = [k for k, _, _ in SECTIONS]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", required=True, help="directory for report.md and the PNG plots")
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes, as CI runs them (~2-3 min on 2 cores; the full suite ~40 min)")
    parser.add_argument("--section", action="append", choices=keys, help="run only this section (repeatable)")
    # internal (child process of run_suite): run one section module, pickle its Section to --result
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--child-module", help=argparse.SUPPRESS)
    parser.add_argument("--child-title", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.result:
        os.makedirs(args.out, exist_ok=True)
        section = run_section(args.child_module, args.child_title, args.out, args.quick)
        with open(args.result, "wb") as f:
            pickle.dump(section, f)
        return 0
    path = run_suite(args.out, quick=args.quick, sections=args.section)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
