"""`clipforge runs ARTIFACTS [RUN_ID]`: the pipeline runs recorded in an artifact store, or one run's stages."""

from __future__ import annotations

import json
from pathlib import Path

from clipforge.commands import number_in
from clipforge.errors import EXIT_PREEMPTED, UserError
from clipforge.tables import print_listing, text_table


def add_parser(sub) -> None:
    parser = sub.add_parser("runs", help="list the pipeline runs recorded in an artifact store, or show one",
                            description="The runs under ARTIFACTS/runs/ (local or s3://), as `clipforge run` and the "
                                        "Kubernetes driver record them after every stage; with RUN_ID (or latest), "
                                        "that run's stages, outputs and what to do next.")
    parser.add_argument("artifacts", metavar="ARTIFACTS",
                        help="the artifact store (local or s3://), or a pipeline spec YAML naming it")
    parser.add_argument("run_id", metavar="RUN_ID", nargs="?", help="a run to show, or `latest`")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--watch", action="store_true",
                        help="with RUN_ID: print each stage's status as it changes until the run is complete "
                             "(exit 0) or failed (exit 1); a run of `clipforge run` that was stopped or whose "
                             "runner is gone exits 75 (rerun it to go on)")
    parser.add_argument("--every", type=seconds, default=10.0, help="seconds between reads with --watch (default: 10)")
    parser.set_defaults(func=run, on_stop="stopped (SIGTERM)")  # it only reads: nothing to go on from


def artifact_store(value: str) -> str:
    """ARTIFACTS as given, or the `artifacts` of the pipeline spec given instead."""
    return spec_store(value)[0]


def spec_store(value: str) -> tuple[str, list[str] | None]:
    """(ARTIFACTS, None) as given; for a pipeline spec, (its `artifacts`, its stages' names): its own runs."""
    if value.endswith((".yaml", ".yml")) and Path(value).is_file():
        from clipforge.config.pipeline import load_pipeline

        spec = load_pipeline(value)
        return spec.artifacts, [stage.name for stage in spec.stages]
    return value, None


# A polling period: 0 would read the store in a busy loop.
seconds = number_in(float, 0.1, float("inf"), "give at least 0.1 seconds")


def table(runs: list[dict]) -> str:
    rows = [("run", "created", "updated", "done", "state")]
    rows += [(r["run_id"], (r["created"] or "-").replace("T", " ").rstrip("Z"),
              (r["updated"] or "-").replace("T", " ").rstrip("Z"), f"{r['stages_done']}/{r['stages']}", r["state"])
             for r in runs]
    return text_table(rows)


def run(args) -> int:
    from clipforge.orchestrate.run_summary import next_steps, summary_table
    from clipforge.orchestrate.runs import list_runs, live_state, read_run, run_uri, watch_run

    artifacts, stages = spec_store(args.artifacts)
    if args.watch:
        if not args.run_id:
            raise UserError("--watch needs a RUN_ID (or latest)")
        state = watch_run(artifacts, args.run_id, args.every, of_stages=stages)
        return 0 if state.startswith("complete") else 1 if state.startswith(("failed", "crashed")) else EXIT_PREEMPTED
    if args.run_id:
        record = read_run(artifacts, args.run_id, stages)
        state = live_state(record, run_uri(artifacts, record["run_id"]))
        if args.json:
            print(json.dumps({**record, "state": state}, indent=2))
        else:
            print(f"run {record['run_id']}: {state} (created {record.get('created')}, "
                  f"updated {record.get('updated')})")
            if record.get("ended") and state in ("failed", "crashed", "stopped"):
                print(f"its runner ended between stages: {record['ended']}")
            print(summary_table(record))
            steps = next_steps(record)
            if state.startswith("lost"):
                steps.insert(0, f"its runner is gone (killed, or its machine lost): rerun it with --run-id "
                                f"{record['run_id']} to go on from what it committed")
            if steps:
                print("next:\n" + "\n".join(steps))
        return 0
    of = f" of {args.artifacts}" if stages else ""
    print_listing(list_runs(artifacts, stages), as_json=args.json, table=table,
                  empty=f"no runs{of} recorded under {artifacts}")
    return 0
