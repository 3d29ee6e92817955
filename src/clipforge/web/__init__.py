"""The browser pages: manual captioning that writes `index.csv`, and search over an indexed folder.

Each page is a small Starlette app served by uvicorn on one socket, with plain
HTML, CSS and one JavaScript module shipped in `static/`: no build step, no
CDN, so it works offline and over `kubectl port-forward`.
"""
