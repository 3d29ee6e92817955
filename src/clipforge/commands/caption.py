"""`clipforge caption DATASET`: caption a folder's images in the browser; every save rewrites DATASET/index.csv."""

from __future__ import annotations

import sys

from clipforge.commands import port_number


def add_parser(sub) -> None:
    parser = sub.add_parser("caption", help="caption the images of a folder in the browser (writes index.csv)",
                            description="Serve a page that shows one image at a time: Enter saves its caption and "
                                        "shows the next uncaptioned image, Esc saves and ends the session. "
                                        "Every save rewrites DATASET/index.csv atomically.")
    parser.add_argument("dataset", help="folder of images (jpg, jpeg, png, webp; searched recursively)")
    parser.add_argument("--port", type=port_number, default=8765,
                        help="port to listen on; 0 picks a free one (default: 8765)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    parser.set_defaults(func=run, on_stop="stopped (SIGTERM); every caption saved is in index.csv")


def run(args) -> int:
    from clipforge.web.captioning import serve_captioning

    summary = serve_captioning(args.dataset, args.host, args.port, on_ready=announcer(args.no_browser))
    sys.stdout.write(f"{summary['captioned']} / {summary['total']} images captioned; saved in {summary['index']}\n")
    return 0


def announcer(no_browser: bool):
    def announce(url: str) -> None:
        sys.stdout.write(f"open {url}  (Ctrl-C stops the server)\n")
        sys.stdout.flush()
        if not no_browser:
            import webbrowser

            webbrowser.open(url)

    return announce
