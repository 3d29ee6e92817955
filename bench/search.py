"""Search latency over a 100,000-row cache: exact (the baseline) against FAISS IVF, and the page's round trip.

Not a test. A synthetic cache of `--rows` L2-normalised 512-D embeddings
(clustered, as CLIP embeddings of a photo collection are: `--clusters` centres
plus noise) is written to a temp folder with the metadata of a tiny 512-D
open_clip model, so `Searcher` loads it exactly as it loads a real cache.
Queries are noisy copies of random rows. Each figure is the median (and 95th
percentile) over `--queries` queries after a warm-up, the best of `--repeat`
rounds; ratios are against exact search measured in the same run. FAISS recall@10 is the share of the exact top
10 that FAISS also returns.

    .venv/bin/python bench/search.py [--rows 100000] [--queries 200] [--repeat 3] [--exact-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from clipforge.data.embeddings import embeddings_to_table, table_to_parquet_bytes
from clipforge.data.synthetic import write_tiny_model
from clipforge.models.encoders import EncoderSpec, describe, load_clip
from clipforge.search import FaissIndex, Searcher
from clipforge.storage import uri as storage
from clipforge.storage.manifest import write_manifest

DIM = 512
SHARD_ROWS = 50_000


def write_cache(prefix: Path, rows: int, clusters: int, model: dict, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    embeddings = centres[rng.integers(clusters, size=rows)] + 0.6 * rng.normal(size=(rows, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = np.array([f"photos/{i // 1000:04d}/{i:07d}.jpg" for i in range(rows)], dtype=object)
    shards = []
    for number, start in enumerate(range(0, rows, SHARD_ROWS)):
        name = f"shard-{number:05d}.parquet"
        part = slice(start, start + SHARD_ROWS)
        table = embeddings_to_table(ids[part], [None] * len(ids[part]), embeddings[part], model)
        storage.write_bytes(str(prefix / name), table_to_parquet_bytes(table))
        shards.append({"path": name, "rows": len(ids[part])})
    write_manifest(str(prefix), kind="cache", config={"source": str(prefix.parent / "photos")},
                   config_fingerprint="bench", inputs={}, shards=shards, rows=rows, model=model)
    return embeddings


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95))


def time_interleaved(calls: dict, inputs: list, repeat: int, warmup: int = 10) -> dict[str, tuple[float, float]]:
    """(p50, p95) ms of each call over the inputs, the best of `repeat` rounds (other work on a small
    machine only ever slows a round down). The calls take turns on every input, so load falls on all
    of them alike."""
    for call in calls.values():
        for item in inputs[:warmup]:
            call(item)
    best = {}
    for _ in range(repeat):
        spent = {name: [] for name in calls}
        for item in inputs:
            for name, call in calls.items():
                started = time.perf_counter()
                call(item)
                spent[name].append(time.perf_counter() - started)
        for name, times in spent.items():
            best[name] = min(best.get(name, (np.inf, np.inf)), percentiles(times))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the queries; the best round counts")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exact-only", action="store_true", help="skip FAISS (its build takes long past 1M rows)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(prefix="clipforge-bench-search-") as tmp:
        root = Path(tmp)
        config, weights = write_tiny_model(root / "models", "bench-tiny", DIM, seed=0)
        spec = EncoderSpec("bench-tiny", str(weights), str(config))
        model, preprocess_cfg = load_clip(spec)
        cache = str(root / "cache")
        embeddings = write_cache(Path(cache), args.rows, args.clusters, describe(spec, model, preprocess_cfg), rng)
        picks = rng.integers(args.rows, size=args.queries)
        noisy = embeddings[picks] + 0.3 * rng.normal(size=(args.queries, DIM)).astype(np.float32) / np.sqrt(DIM)
        queries = [torch.from_numpy(q[None]) for q in noisy]
        texts = [f"photo number {i} of a red bicycle" for i in range(args.queries)]

        started = time.perf_counter()
        exact = Searcher(cache)
        notes = [f"cache load {time.perf_counter() - started:.2f} s"]
        vector_calls = {"exact search, ms (baseline)": lambda q: exact._top(q, args.k),
                        # What exact search did before ties were ranked in row order (`search.top_rows`).
                        "exact search, torch.topk alone, ms": lambda q: torch.topk(
                            exact.matrix @ torch.nn.functional.normalize(q.float(), dim=-1)[0], args.k)}
        text_calls = {"text query end to end (tiny text encoder), exact, ms": lambda t: exact.text(t, args.k)}
        # A page's queries run on its server's thread; they are timed in rounds of their own, after
        # this thread's calls.
        page_calls = {}
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(page_client(cache, faiss=False))
            page_calls["page round trip GET /api/search, exact, ms"] = partial(page_query, client, k=args.k)
            if not args.exact_only:
                started = time.perf_counter()
                built = FaissIndex(cache, exact.table)
                build_s = time.perf_counter() - started
                started = time.perf_counter()
                reused = FaissIndex(cache, exact.table)
                notes.append(f"FAISS IVF: {built.nlist} lists, {reused.index.nprobe} scanned per query; "
                             f"build {build_s:.2f} s, reuse from file {time.perf_counter() - started:.2f} s")
                approximate = Searcher(cache, faiss=True)
                assert reused.reused and approximate.faiss.reused and not built.reused
                vector_calls["FAISS IVF search, ms"] = lambda q: approximate._top(q, args.k)
                text_calls["text query end to end (tiny text encoder), FAISS, ms"] = \
                    lambda t: approximate.text(t, args.k)
                faiss_client = stack.enter_context(page_client(cache, faiss=True))
                page_calls["page round trip GET /api/search, FAISS, ms"] = partial(page_query, faiss_client, k=args.k)
                recall = np.mean([overlap(exact._top(q, args.k), approximate._top(q, args.k)) for q in queries])
                notes.append(f"FAISS recall@{args.k} against exact: {recall:.3f}")
            figures = {**time_interleaved(vector_calls, queries, args.repeat),
                       **time_interleaved(text_calls, texts, args.repeat)}
            # One server at a time, as the page is used.
            for name, call in page_calls.items():
                figures.update(time_interleaved({name: call}, texts, args.repeat))

    baseline = figures["exact search, ms (baseline)"][0]
    print(f"\nsearch benchmark: {args.rows} rows x {DIM}-D ({args.clusters} clusters), k={args.k}, "
          f"{args.queries} queries, best of {args.repeat}; {os.cpu_count()} CPUs, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}, Python {platform.python_version()}")
    width = max(map(len, figures))
    print(f"  {'figure':<{width}}  {'p50':>8}  {'p95':>8}  p50 / exact search p50")
    for name, (p50, p95) in figures.items():
        print(f"  {name:<{width}}  {p50:8.2f}  {p95:8.2f}  {p50 / baseline:.3f}")
    for note in notes:
        print(f"  {note}")


def overlap(want: list, got: list) -> float:
    """Share of the wanted hits that were found."""
    return len({hit.id for hit in want} & {hit.id for hit in got}) / len(want)


def page_query(client, text: str, k: int) -> None:
    client.get("/api/search", params={"q": text, "k": k}).raise_for_status()


@contextlib.contextmanager
def page_client(cache: str, faiss: bool):
    """An HTTP client of the search page's server over `cache` (uvicorn in a thread, on loopback)."""
    import httpx

    from clipforge.web.search_app import SearchServer

    with tempfile.TemporaryDirectory() as thumbs:
        server = SearchServer(cache, faiss=faiss, thumbnail_cache=thumbs)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=server.url) as client:
                yield client
        finally:
            server.stop()
            thread.join(10)


if __name__ == "__main__":
    main()
