"""`clipforge serve --index CACHE`: a search page over an indexed image collection, in the browser."""

from __future__ import annotations

from clipforge.commands import port_number
from clipforge.commands.caption import announcer


def add_parser(sub) -> None:
    parser = sub.add_parser("serve", help="search an indexed image collection in the browser")
    parser.add_argument("--index", required=True, help="cache of the collection (from `clipforge cache`)")
    parser.add_argument("--model", help="model name; default: the one the index was built with")
    parser.add_argument("--pretrained", help="weights; default: those the index was built with (give "
                        "their path when the index recorded it relative to another directory)")
    parser.add_argument("--model-config", help="JSON model config, for custom models")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                        help="where queries are encoded (default: cpu; auto prefers CUDA)")
    parser.add_argument("--faiss", action="store_true",
                        help="approximate search with a FAISS IVF index built once next to the cache "
                             "(CACHE.faiss/); for collections past ~1M images")
    parser.add_argument("--port", type=port_number, default=8766,
                        help="port to listen on; 0 picks a free one (default: 8766)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    parser.set_defaults(func=run, on_stop="stopped (SIGTERM)")


def run(args) -> int:
    from clipforge.web.search_app import serve_search

    serve_search(args.index, model=args.model, pretrained=args.pretrained, model_config=args.model_config,
                 device=args.device, faiss=args.faiss, host=args.host, port=args.port,
                 on_ready=announcer(args.no_browser))
    return 0
