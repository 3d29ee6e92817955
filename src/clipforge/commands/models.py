"""`clipforge models list`: the fine-tuned models in a folder, with their base, date, data and val figures."""

from __future__ import annotations

from clipforge.tables import print_listing, text_table


def add_parser(sub) -> None:
    parser = sub.add_parser("models", help="list fine-tuned models")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="each fine-tuned model in DIR: base, date, data size, val metrics",
                                 description="Each run folder under DIR (from `clipforge finetune --out DIR`).")
    listing.add_argument("--dir", default="models_finetuned", help="folder of runs, local or s3:// "
                                                                   "(default: models_finetuned)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)


def _figure(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


def table(models: list[dict]) -> str:
    """One line per model; R@1 both ways and the val loss of its model.pt (the last epoch's weights), and the
    epoch that scored best with its R@1 image->text (its weights are not kept)."""
    header = ("name", "status", "base", "created", "train", "val", "epochs", "R@1 i->t", "R@1 t->i", "val loss",
              "best epoch", "best R@1 i->t")
    rows = [header]
    for m in models:
        final, best = m.get("final") or {}, m.get("best") or {}
        # A run whose card does not read says nothing of its base: not "random", which would be a claim.
        base = f"{m['model']} ({m.get('pretrained') or 'random'})" if m.get("model") else "-"
        rows.append((m["name"], m["status"], base, (m.get("created") or "-")[:16].replace("T", " "),
                     _figure(m.get("train_rows"), "{}"), _figure(m.get("val_rows"), "{}"),
                     _figure(m.get("epochs"), "{}"), _figure(final.get("image_to_text_R@1"), "{:.3f}"),
                     _figure(final.get("text_to_image_R@1"), "{:.3f}"), _figure(final.get("val_loss"), "{:.4f}"),
                     _figure(m.get("best_epoch"), "{}"), _figure(best.get("image_to_text_R@1"), "{:.3f}")))
    return text_table(rows)


def run_list(args) -> int:
    from clipforge.stages.finetune_runs import finetuned_models

    print_listing(finetuned_models(args.dir), as_json=args.json, table=table,
                  empty=f"no fine-tuned models in {args.dir}")
    return 0
