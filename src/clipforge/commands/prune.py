"""`clipforge prune ARTIFACTS`: delete the stage outputs only older runs used, and their run records."""

from __future__ import annotations

import json

from clipforge.commands import number_in
from clipforge.errors import UserError
from clipforge.tables import text_table


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "prune", help="delete the outputs in an artifact store that only older runs used",
        description="Keep the newest --keep runs under ARTIFACTS/runs/ that have an output (one that failed before "
                    "its first stage takes no place), the runs since, and every run that may still be running, "
                    "with every stage output they name (made, reused, or read by path), so the next run still "
                    "reuses them; delete the other stage outputs (ARTIFACTS/<kind>/<key>/) and the older runs' "
                    "records. Without --yes it only lists what it would delete, and writes nothing. Folders that "
                    "are no stage output, and outputs whose lease a writer holds, are left alone. Exit 2 when a "
                    "run record does not read, or an output could not be deleted.")
    parser.add_argument("artifacts", metavar="ARTIFACTS",
                        help="the artifact store (local or s3://), or a pipeline spec YAML naming it")
    parser.add_argument("--keep", type=number_in(int, 1, float("inf"), "keep at least 1 run"), default=10,
                        help="newest runs with an output to keep, by creation (default: 10)")
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
    if not args.json:
        for uri, holder in plan.held.items():
            print(f"left alone: {uri} (no kept run names it, but its lease is held: {holder})")
        if plan.outputs:
            print(text_table([("output", "size")] + [(uri, human_bytes(plan.bytes[uri])) for uri in plan.outputs]))
        if not work:
            print(f"nothing to prune under {artifacts}; keeping {counted(plan.kept_runs, 'run')}")
        elif not args.yes:
            print(f"would delete {what}. Run again with --yes to delete them.")
    deleted, kept, failed, records = apply_prune(artifacts, plan) if args.yes and work else ([], [], [], 0)
    if args.json:
        print(json.dumps({**plan.as_json(), "deleted": deleted, "kept_after_all": kept, "failed": failed},
                         indent=2))
    elif args.yes and work:
        for line in kept:
            print(f"kept after all: {line}")
        print(f"deleted {counted(deleted, 'output')} of {len(plan.outputs)} and the records of "
              f"{counted(range(records), 'run')}; keeping {counted(plan.kept_runs, 'run')}")
    if failed:
        raise UserError(f"could not delete {counted(failed, 'output')}: {'; '.join(failed)}")
    return 0


def counted(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
