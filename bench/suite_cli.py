"""``python -m bench --suite quick|full|extended [--parts ...] [--plan] [--resume]``: see :mod:`bench.parts`.

    python -m bench --suite full --plan      # job counts and estimated minutes per part, runs nothing
    python -m bench --suite full             # every part that feeds README.md's Benchmarks tables, then the README
    python -m bench --suite full --resume    # after an interruption: reuse every finished job of every part
    python -m bench --suite full --parts recipe combination     # a subset
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from bench.parts import SuiteRun
from bench.run import RESULTS
from bench.suites import ALL_PARTS, SUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--parts", "--only", nargs="+", choices=ALL_PARTS, dest="parts",
                        help="run only these parts (default: the suite's; --only is the old name)")
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: print every part's job count and estimated minutes on 2 idle cores")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files and charts")
    parser.add_argument("--report-only", action="store_true", help="re-render every part's report from its results")
    parser.add_argument("--resume", action="store_true",
                        help="reuse every finished job of every part (each part's cache; a missing cache is seeded from "
                             "the part's committed results)")
    parser.add_argument("--tasks", nargs="+", choices=["trec", "rt", "bbc"],
                        help="run only these tasks' accuracy jobs (e.g. two processes sharing one --resume cache)")
    parser.add_argument("--libs", nargs="+", choices=["deltatune", "peft"],
                        help="run only these libraries' accuracy jobs (with --tasks: split one suite over processes)")
    parser.add_argument("--cached-only", action="store_true",
                        help="with --resume: report the finished jobs only, run nothing (a run cut short; the report "
                             "counts the jobs not run)")
    parser.add_argument("--no-readme", action="store_true", help="do not regenerate README.md's tables at the end")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    parts = list(args.parts or suite.parts)
    if args.plan:
        from bench.plan import print_plan

        print_plan(args.suite, suite, parts)
        return 0
    if args.cached_only and not args.resume:
        parser.error("--cached-only needs --resume (it reports the jobs an earlier run finished)")
    if args.tasks:
        suite = replace(suite, tasks=[t for t in suite.tasks if t in args.tasks])
    if args.libs:
        suite = replace(suite, methods=suite.methods if "deltatune" in args.libs else [],
                        peft_methods=suite.peft_methods if "peft" in args.libs else [])
    args.out.mkdir(parents=True, exist_ok=True)
    run = SuiteRun(suite, args.out, resume=args.resume, cached_only=args.cached_only,
                   command=f"python -m bench --suite {args.suite}")
    if args.report_only:
        run.reports(parts)
    else:
        run.run(parts)
    if not args.no_readme and args.out.resolve() == RESULTS.resolve() and suite.name == "full":
        from bench import readme

        readme.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
