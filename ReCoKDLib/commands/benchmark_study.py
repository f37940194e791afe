"""``recokd benchmark-study CONFIG -o DIR``: a whole distillation study (teachers, students × seeds,
ablations, latency) from one JSON config, resumable, ending in a report."""

from __future__ import annotations

import argparse

from . import add_command


DESCRIPTION = (
    "Plans each dataset, trains the teachers, distils every student variant for every seed, runs "
    "the ablations and a latency benchmark, then writes report.md, results.json and figures into -o. "
    "Finished jobs are skipped; interrupted runs resume from their last checkpoint: run the same command again."
)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..workflows.study import build_report, check_study_folder, load_config, plan_jobs, run_study

    check_study_folder(Path(args.output).resolve())  # the overwrite rule, before the config is read
    config = load_config(args.config)
    if args.list:
        for job in plan_jobs(config, args.output):
            print(f"{'done   ' if job.done() else 'todo   '}{job.name}")
        return 0
    if args.report_only:
        build_report(config, args.output, plan_jobs(config, args.output))
        return 0
    _, failed = run_study(config, args.output, jobs=args.jobs, only=args.only)
    if failed:
        print(f"{len(failed)} job(s) failed or were skipped: {', '.join(failed[:8])}; see the logs, fix, and run again")
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "benchmark-study", run, help="run a distillation study from a JSON config (resumable) and report it", description=DESCRIPTION)
    p.add_argument("config", help="study config JSON (see configs/study.json)")
    p.add_argument("-o", "--output", default="recokd_study", help="study folder (default ./recokd_study)")
    p.add_argument("--jobs", type=int, help="jobs in parallel (default: the config's)")
    p.add_argument("--only", nargs="+", help="run only jobs with these names or prefixes (e.g. LA2018-lowres/)")
    p.add_argument("--list", action="store_true", help="list the jobs and whether they are done, run nothing")
    p.add_argument("--report-only", dest="report_only", action="store_true", help="only rebuild the report")
