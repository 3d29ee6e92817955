"""Cache shards, as the stage and both engines (`cache_local`, `cache_ray`) see them: how sorted ids are cut
into shards and named, which of a plan's shards an output already holds whole, and how one is committed.

A shard is committed as one parquet file written atomically under a name that depends only on its ids, the
config and the inputs: present means whole, so a crash costs at most the shards in flight, and a run with
either engine skips what any run committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipforge.data.embeddings import METADATA_KEY, embeddings_to_table, table_to_parquet_bytes
from clipforge.data.index import RowIndex
from clipforge.errors import UserError
from clipforge.storage import parquet
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.cache")
SHARD_PREFIX = "shard-"


@dataclass(frozen=True)
class Shard:
    """One unit of commit: consecutive sorted ids, written as `name` under the output prefix."""

    index: int
    name: str
    ids: np.ndarray
    splits: list[str | None]


def plan_shards(index: RowIndex, batch_size: int, identity: str) -> list[Shard]:
    """Cut sorted ids into shards; a shard's name depends on its ids, the config and the inputs' identity,
    never on timing."""
    shards = []
    for number, start in enumerate(range(0, len(index), batch_size)):
        ids = index.ids[start : start + batch_size]
        tag = hashlib.sha256(identity.encode() + "\n".join(map(str, ids)).encode()).hexdigest()[:12]
        shards.append(Shard(number, f"{SHARD_PREFIX}{number:05d}-{tag}.parquet", ids,
                            index.splits[start : start + batch_size]))
    return shards


def pending_shards(output: str, plans: list[list[Shard]], unlike: str = "") -> tuple[list[Shard], list[Shard]]:
    """(the plan, its shards not yet committed). The plan is the first of `plans` that names every shard file
    already under `output` (an unfinished run's: caches begun while `output` counted in the fingerprint have
    other shard names), else the first; shard files of no plan mean the output belongs to something else,
    a refusal that `unlike` (how their planned config differs) explains.

    A shard file is committed whole (written under a temporary name, then renamed), so one that does not
    read back whole was damaged afterwards (a disk, a copy cut short): it is encoded again, not trusted."""
    names = storage.list_names(output)
    others = [name for name in names + [f"{folder}/" for folder in storage.list_folders(output)]
              if not name.startswith((".", "_", SHARD_PREFIX))]  # what pyarrow.dataset skips, and shards
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise UserError(f"output {output} holds {others[0]}{more}, which is not a cache's: pyarrow.dataset({output}) "
                        "would read it with the shards; give the cache a folder of its own")
    present = {name for name in names if name.startswith(SHARD_PREFIX)}
    shards = next((plan for plan in plans if present and present <= {s.name for s in plan}), plans[0])
    planned = {s.name for s in shards}
    foreign = sorted(present - planned)
    if foreign:
        raise UserError(f"output {output} holds {len(foreign)} shard files of another config, index, weights file "
                        f"or image set (e.g. {foreign[0]}){unlike}; choose a new --output or remove them")
    committed = [s for s in shards if s.name in present]
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda shard: shard_problem(output, shard), committed))
    for shard, why in zip(committed, problems, strict=True):
        if why:
            log.warning("shard %s is damaged (%s): encoding it again", storage.join(output, shard.name), why)
            storage.delete(storage.join(output, shard.name))
            present.discard(shard.name)
    return shards, [s for s in shards if s.name not in present]


def shard_problem(output: str, shard: Shard) -> str | None:
    """Why a shard file cannot be taken as committed (unreadable, or another row count than planned). A read
    that fails (the store, the network) is no answer: it raises, and the shard stays."""
    try:
        data = storage.read_bytes(storage.join(output, shard.name))
    except UserError:  # gone since the listing (a prune, a hand): encoded again
        return "gone since it was listed"
    try:
        rows = parquet.read_table(data)  # every page
    except Exception as exc:  # pyarrow raises several types for truncated or corrupt files
        return f"unreadable: {type(exc).__name__}"
    return None if rows.num_rows == len(shard.ids) else f"{rows.num_rows} rows where {len(shard.ids)} were planned"


def model_from_shard(output: str, name: str) -> dict:
    """The model description a committed shard's schema metadata holds (the encoder that wrote it)."""
    schema = parquet.read_schema(storage.read_bytes(storage.join(output, name)))
    return json.loads(schema.metadata[METADATA_KEY])["model"]


def commit_shard(output: str, shard_name: str, ids, splits, embeddings: np.ndarray, description: dict) -> None:
    """Write one shard's parquet file atomically under its final name: committed, or absent. Embeddings that
    are not all finite (weights holding NaN, activations overflowing fp16) are refused, not cached."""
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        raise UserError(f"encoder {description.get('name')} gave NaN or infinite embeddings for "
                        f"{int((~finite).sum())} of shard {shard_name}'s {len(finite)} images (id "
                        f"{np.asarray(ids)[~finite][0]} the first): its weights hold them, or its precision "
                        "overflows (pure_fp16, fp16: try bf16 or fp32); nothing of the shard is written")
    splits = [None if s == "" or s is None else str(s) for s in splits]
    table = embeddings_to_table(ids, splits, embeddings, description)
    storage.write_bytes(storage.join(output, shard_name), table_to_parquet_bytes(table))


def steady_rate(commits: list[tuple[float, int]]) -> float | None:
    """Rows per second between the first and the last commit; the first shard's rows are start-up."""
    commits = sorted(commits)
    span = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0
    return round(sum(rows for _, rows in commits[1:]) / span, 2) if span > 0 else None
