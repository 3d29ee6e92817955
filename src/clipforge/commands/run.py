"""`clipforge run SPEC`: run a pipeline spec's stages locally, in order, resuming where it stopped."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run a pipeline spec (jobs/*.yaml) locally")
    parser.add_argument("spec", help="pipeline spec YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value, e.g. stages.adapter.with.epochs=5 (repeatable)")
    parser.add_argument("--run-id", help="run id (default: the spec's, else generated); reuse one to resume")
    parser.set_defaults(func=run)
    schema = sub.add_parser("schema", help="print the JSON Schema of pipeline specs")
    schema.set_defaults(func=print_schema)


def run(args) -> int:
    from clipforge.orchestrate.local import run_spec

    record = run_spec(args.spec, args.overrides, args.run_id)
    stages = record.data["stages"].values()
    if any(s.get("status") == "failed" for s in stages):
        return 1
    # Stopped by SIGTERM (75) or Ctrl-C (130) after saving progress: the stage's own code, for the caller.
    return next((s["exit_code"] for s in stages if s.get("status") == "interrupted"), 0)


def print_schema(args) -> int:
    import json
    import sys

    from clipforge.config.pipeline import pipeline_json_schema

    json.dump(pipeline_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
