"""`clipforge drive SPEC --run-id RUN`: run a pipeline on Kubernetes, one Job per stage (the chart's driver)."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("drive", help="run a pipeline spec on Kubernetes: one Job per stage, resumable",
                            description=__doc__.splitlines()[0] + " A restarted driver with the same run id "
                            "skips finished stages and re-attaches to running stage Jobs.")
    parser.add_argument("spec", help="pipeline spec YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value, e.g. artifacts=s3://bucket/prefix (repeatable)")
    parser.add_argument("--run-id", help="the run to start or resume (default: the spec's run_id)")
    parser.add_argument("--settings", metavar="FILE",
                        help="stage pod settings YAML (image, GPU resource name, nodeSelector, ...; "
                             "the chart's driver.yaml)")
    parser.add_argument("--image", help="the clipforge image for stage pods (overrides the settings file)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--namespace", help="namespace of stage Jobs (default: POD_NAMESPACE, else the context's)")
    parser.add_argument("--watch-seconds", type=int, default=60,
                        help="server-side timeout of each watch on a stage Job (default: 60)")
    parser.add_argument("--check-store", action="store_true",
                        help="only check that the spec's artifact store is reachable and writable, and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.k8s_driver import check_store, drive
    from clipforge.orchestrate.run_summary import exit_code

    if args.check_store:
        check_store(load_pipeline(args.spec, args.overrides).artifacts)
        return 0
    record = drive(args.spec, run_id=args.run_id, overrides=args.overrides, settings_path=args.settings,
                   image=args.image, kubeconfig=args.kubeconfig, namespace=args.namespace,
                   watch_seconds=args.watch_seconds)
    return exit_code(record)
