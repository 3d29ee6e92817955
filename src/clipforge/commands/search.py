"""`clipforge search --index CACHE "a red bicycle"`: the images of an indexed folder nearest a text."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from clipforge.commands import number_in


def add_parser(sub) -> None:
    parser = sub.add_parser("search", help="search an indexed image collection by text or by an image")
    parser.add_argument("query", nargs="?", default="", help="text to search for")
    parser.add_argument("--index", required=True, help="cache of the collection (from `clipforge cache`)")
    parser.add_argument("--image", help="search by this image instead of a text")
    parser.add_argument("-k", type=number_in(int, 1, float("inf"), "give at least 1"), default=10,
                        help="results to show (default: 10)")
    parser.add_argument("--model", help="model name; default: the one the index was built with")
    parser.add_argument("--pretrained", help="weights; default: those the index was built with (a relative path "
                        "is found from here, else from the directory it was built in)")
    parser.add_argument("--model-config", help="JSON model config, for custom models")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="where queries are encoded (default: cpu; auto prefers CUDA)")
    parser.add_argument("--faiss", action="store_true",
                        help="approximate search through a FAISS index built once next to the cache (large indexes)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(func=run)


def run(args) -> int:
    from clipforge.errors import UserError
    from clipforge.search import Searcher
    from clipforge.storage import uri as storage
    from clipforge.tables import escape_controls

    if bool(args.query) == bool(args.image):
        raise UserError("give a text query or --image, not both and not neither")
    searcher = Searcher(args.index, args.model, args.pretrained, args.model_config, args.device, faiss=args.faiss)
    if args.image:
        hits = searcher.image(storage.read_bytes(args.image), args.k, name=args.image)
    else:
        hits = searcher.text(args.query, args.k)
        if note := searcher.cut_note(args.query):
            logging.getLogger("clipforge.search").warning("%s", note)
    if args.json:
        json.dump([hit.__dict__ for hit in hits], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not hits:  # FAISS scans some lists only: a query can find fewer rows than asked, even none
        sys.stdout.write("no results\n")
        return 0
    shown = [escape_controls(hit.path) for hit in hits]  # a file name holding a newline stays on its row
    width = max(len(path) for path in shown)
    # A cache of HDF5 rows lists row ids, which are no files; a folder given relative to where the index was
    # built is not "gone" either: the warning says where to run from.
    files = searcher.root is not None and not searcher.root_is_elsewhere()
    sys.stdout.write(f"{'rank':>4}  {'score':>7}  {'path' if searcher.root is not None else 'id'}\n")
    for rank, (hit, path) in enumerate(zip(hits, shown, strict=True), 1):
        gone = "  (gone since it was indexed)" if files and is_gone(hit.path) else ""
        sys.stdout.write(f"{rank:>4}  {hit.score:7.4f}  {path:<{width}}{gone}\n")
    return 0


def is_gone(path: str) -> bool:
    """A local image deleted or moved since the index was built (S3 objects are not looked up per hit)."""
    return not path.startswith("s3://") and not Path(path).exists()
