"""`clipforge prune ARTIFACTS`: delete the stage outputs only older runs used, and their run records."""

from __future__ import annotations

import json

from clipforge.commands import number_in
from clipforge.tables import text_table


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "prune", help="delete the outputs in an artifact store that only older runs used",
        description="Keep the newest --keep runs under ARTIFACTS/runs/ and every run that may still be running, "
                    "with every stage output they recorded (so the next run still reuses them); delete the other "
                    "stage outputs (ARTIFACTS/<kind>/<key>/) and the older runs' records. Without --yes it only "
                    "lists what it would delete. Folders that are no stage output, and outputs whose lease a "
                    "writer holds, are left alone.")
    parser.add_argument("artifacts", metavar="ARTIFACTS",
                        help="the artifact store (local or s3://), or a pipeline spec YAML naming it")
    parser.add_argument("--keep", type=number_in(int, 1, float("inf"), "keep at least 1 run"), default=10,
                        help="newest runs to keep, by creation (default: 10)")
    parser.add_argument("--yes", action="store_true", help="delete; without it, only list what would go")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.commands.runs import artifact_store
    from clipforge.orchestrate.prune import apply_prune, human_bytes, plan_prune

    artifacts = artifact_store(args.artifacts)
    plan = plan_prune(artifacts, args.keep)
    work = bool(plan.outputs or plan.pruned_runs)
    what = (f"{counted(plan.outputs, 'output')} and the records of {counted(plan.pruned_runs, 'run')} "
            f"({human_bytes(sum(plan.bytes.values()))}); keeping {counted(plan.kept_runs, 'run')}")
    if args.json:
        print(json.dumps({**plan.as_json(), "deleted": args.yes and work}, indent=2))
    else:
        for uri in plan.held:
            print(f"left alone: {uri} (no kept run recorded it, but a writer holds its lease)")
        if plan.outputs:
            print(text_table([("output", "size")] + [(uri, human_bytes(plan.bytes[uri])) for uri in plan.outputs]))
        if not work:
            print(f"nothing to prune under {artifacts}; keeping {counted(plan.kept_runs, 'run')}")
        elif not args.yes:
            print(f"would delete {what}. Run again with --yes to delete them.")
    if args.yes and work:
        apply_prune(artifacts, plan)
        if not args.json:
            print(f"deleted {what}")
    return 0


def counted(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
