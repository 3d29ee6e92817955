"""`clipforge run SPEC`: run a pipeline spec's stages locally, in order, resuming where it stopped."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "run", help="run a pipeline spec (jobs/*.yaml) locally",
        description="Run a pipeline spec's stages on this machine, each as a `clipforge` subprocess (what a "
        "Kubernetes Job runs), in dependency order. Finished stages are reused; a rerun with the same --run-id "
        "resumes the one that stopped. Exit code 3: a stage failed; 2: a mistake in the spec; 75 or 130: a stage "
        "was stopped (SIGTERM, Ctrl-C) after saving its progress.")
    parser.add_argument("spec", help="pipeline spec YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value, e.g. stages.adapter.with.epochs=5 (repeatable)")
    parser.add_argument("--run-id", help="run id (default: the spec's, else generated); reuse one to resume")
    parser.set_defaults(func=run)
    check = sub.add_parser(
        "check", help="check a pipeline spec without running it (before `helm install --set-file pipeline=`)",
        description="Check a pipeline spec as `run`, `drive` and the chart's driver read it: every stage's "
        "settings, needs and resources; all mistakes at once, exit code 2. Nothing runs.")
    check.add_argument("spec", help="pipeline spec YAML")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec value, as `run --set` does (repeatable)")
    check.add_argument("--inputs", choices=("local", "cluster"),
                       help="also look for the files and folders the stages read: `local` as `clipforge run` does "
                       "here (paths and S3), `cluster` as the driver does (S3 only: local paths are the pods')")
    check.set_defaults(func=check_spec)
    schema = sub.add_parser("schema", help="print the JSON Schema of pipeline specs")
    schema.set_defaults(func=print_schema)


def run(args) -> int:
    from clipforge.orchestrate.local import run_spec
    from clipforge.orchestrate.run_summary import exit_code

    return exit_code(run_spec(args.spec, args.overrides, args.run_id, quiet=args.quiet))


def check_spec(args) -> int:
    import os
    import sys

    from clipforge.config.pipeline import load_pipeline, order_stages
    from clipforge.errors import UserError
    from clipforge.orchestrate.preflight import machine_problems, missing_inputs

    spec = load_pipeline(args.spec, args.overrides)
    stages = order_stages(spec)
    unanswered: list[str] = []
    missing = missing_inputs(spec, local=args.inputs == "local", unanswered=unanswered) if args.inputs else []
    missing += machine_problems(spec) if args.inputs == "local" else []
    if missing:
        raise UserError(f"{args.spec}: {'; '.join(missing)}"
                        + (f" (relative paths are read from {os.getcwd()})" if args.inputs == "local" else ""))
    sys.stdout.write(f"{args.spec}: {len(stages)} stage{'s' if len(stages) != 1 else ''}, in order: "
                     f"{', '.join(stage.name for stage in stages)}\n")
    if not args.inputs:
        sys.stdout.write("inputs not looked for: --inputs local looks for them as `clipforge run` does here, "
                         "--inputs cluster as the driver does\n")
    elif unanswered:  # not missing, not found either: the stages meet them with their own credentials
        more = f" (and {len(unanswered) - 1} more)" if len(unanswered) > 1 else ""
        sys.stdout.write(f"{len(unanswered)} s3:// input{'s' if len(unanswered) > 1 else ''} not looked up here, "
                         f"S3 gave no answer: {unanswered[0]}{more}\n")
    return 0


def print_schema(args) -> int:
    import json
    import sys

    from clipforge.config.pipeline import pipeline_json_schema

    json.dump(pipeline_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
