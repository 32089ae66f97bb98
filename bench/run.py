"""versionfs benchmarks: ``make bench`` (or ``python bench/run.py [--only NAME]``).

Every benchmark group is a module ``bench_<group>.py`` in this directory with a
``run(ctx) -> Result`` that measures its own reference in the same run (so
machine and disk speed cancel out) and returns rows for one markdown table. The
table is printed and, after a full run, written into bench/README.md between the
results markers. Add a group by writing another module and listing it in GROUPS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import README, Context, Result, fmt_table, write_readme  # noqa: E402

GROUPS = ["read", "compressed", "parallel", "commit", "commit_files", "s3", "commit_s3", "outage", "image", "history",
          "scale", "staging"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=GROUPS, action="append", help="run only this group (repeatable); README is then left alone")
    p.add_argument("--reps", type=lambda v: max(1, int(v)), default=5, help="repetitions per measurement (median reported)")
    args = p.parse_args()
    ctx = Context(reps=args.reps)
    results: dict[str, Result] = {}
    failed = []
    for name in args.only or GROUPS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = importlib.import_module(f"bench_{name}").run(ctx)
        except Exception as e:  # noqa: BLE001 - one group's failure must not lose the others' results
            traceback.print_exc()
            failed.append(name)
            results[name] = Result(f"**failed**: {type(e).__name__}: {e}", [])
    table = fmt_table(results)
    print(table, end="")
    if not args.only:
        write_readme(table)
        print(f"(written to {README.relative_to(Path.cwd()) if README.is_relative_to(Path.cwd()) else README})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
