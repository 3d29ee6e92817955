"""The generate stage: cached embeddings -> images, with diffusers' Stable unCLIP (image variation).

Plan: the cache's rows of one split (optionally a seeded subset), checked for
NaNs; each embedding is mapped into the pipeline's conditioning space by the
adapter or by zero-padding. Compute: batches through the pipeline together,
one generator per id seeded from (seed, id), so an id's image does not depend
on its batch. Commit: a batch's PNGs, then its row file under `batches/`;
`generated.parquet` and `_manifest.json` last. A rerun skips committed ids; one that
chooses other ids (a smaller limit) first removes the old manifest and the images it
will not list, so the folder never holds images of no result. It removes only what
generate wrote (`own_images`): an `out` holding anything else is refused before any work.
The pipeline itself is found, identified and loaded in `generate_pipeline.py`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time

import numpy as np
import pandas as pd
import torch

from clipforge.config.adapter import adapter_folder
from clipforge.config.generate import GenerateConfig
from clipforge.data.embeddings import EmbeddingTable, read_embeddings
from clipforge.errors import UserError
from clipforge.models.adapter import adapter_identity, check_finished, check_trained_on, load_adapter
from clipforge.models.encode import resolve_device, resolve_precision
from clipforge.orchestrate.lease import command_lease
from clipforge.progress import Progress
from clipforge.stages.adapter_data import cache_fingerprint
from clipforge.stages.generate_pipeline import load_unclip, pipeline_identity
from clipforge.storage import folders, parquet
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    digest,
    finished_manifest,
    input_changes,
    is_up_to_date,
    read_manifest,
    refuse_foreign_files,
    refuse_other_kind,
    withdraw,
    write_manifest,
)

log = logging.getLogger("clipforge.generate")
BATCH_PATH = re.compile(r"batches/batch-[0-9a-f]{12}\.parquet")  # the name generate_batch gives a batch's rows


def id_seed(seed: int, row_id) -> int:
    """The generator seed of one id: stable across runs, batches and machines."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def select_rows(cfg: GenerateConfig, table: EmbeddingTable) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids, embeddings, the rows they were chosen from in words) to generate for, sorted by id; NaN or inf rows
    are named. A cache without a split column has no test rows to keep apart: all its rows are chosen from,
    and the log says so rather than calling them the split asked for."""
    keep = np.ones(len(table.ids), dtype=bool)
    scope = f"all {len(table.ids)} rows"
    if cfg.split and table.has_splits():
        keep, scope = table.splits == cfg.split, f"split {cfg.split}"
    ids, embeddings = table.ids[keep], table.embeddings[keep]
    if len(ids) == 0:
        raise UserError(f"{cfg.embeddings} has no rows in split {cfg.split!r}")
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise UserError(f"{cfg.embeddings}: NaN or inf embeddings for ids {', '.join(map(str, ids[bad][:5]))}"
                        f"{' …' if bad.sum() > 5 else ''}")
    order = np.argsort(ids, kind="stable")
    ids, embeddings = ids[order], embeddings[order]
    if cfg.limit and cfg.limit < len(ids):
        # A prefix of one seeded permutation: a larger limit keeps every id of a smaller one (its images too).
        chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(ids))[: cfg.limit])
        ids, embeddings = ids[chosen], embeddings[chosen]
    if cfg.split and not table.has_splits():
        log.info("%s has no split column: choosing %d of all %d rows", cfg.embeddings, len(ids), len(table.ids))
    return ids, embeddings, scope


class Conditioning:
    """Maps cached embeddings into the pipeline's image-embedding space."""

    def __init__(self, cfg: GenerateConfig, cache_dim: int, cache_model: dict, pipeline_dim: int):
        self.adapter = None
        self.embed_norm = cfg.embed_norm
        if cfg.adapter:
            self.adapter = load_adapter(cfg.adapter)
            spec = self.adapter.spec
            if spec.in_dim != cache_dim:
                raise UserError(f"adapter {cfg.adapter} takes {spec.in_dim}-D embeddings, but {cfg.embeddings} "
                                f"holds {cache_dim}-D ones")
            check_trained_on(cfg.adapter, "source", cfg.embeddings, cache_model)
            if spec.out_dim != pipeline_dim:
                raise UserError(f"adapter {cfg.adapter} gives {spec.out_dim}-D embeddings, but pipeline "
                                f"{cfg.pipeline} takes {pipeline_dim}-D ones")
            self.source, self.fingerprint = "adapter", adapter_identity(cfg.adapter)
        else:
            self.width = cfg.zero_pad or pipeline_dim
            if self.width != pipeline_dim or cache_dim > pipeline_dim:
                raise UserError(f"zero-padding {cache_dim}-D embeddings to {self.width}-D does not fit pipeline "
                                f"{cfg.pipeline}, which takes {pipeline_dim}-D ones")
            self.source, self.fingerprint = "zero-pad", None

    @torch.no_grad()
    def __call__(self, embeddings: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(embeddings)
        if self.adapter is not None:
            x = self.adapter(x)
        else:
            x = torch.nn.functional.pad(x, (0, self.width - x.shape[1]))
        if self.embed_norm:
            x = torch.nn.functional.normalize(x, dim=-1) * self.embed_norm
        return x


# The settings that decide an id's image besides the id (not split, limit or batch size, which only choose and
# group the ids: a larger `limit` reuses the images there are).
IMAGE_SETTINGS = ("steps", "guidance", "noise_level", "embed_norm", "seed")


def image_settings(cfg: GenerateConfig, inputs: dict, precision: str) -> str:
    """The digest of what decides an id's image: IMAGE_SETTINGS, the inputs and precision, and a `revision` (the
    code that made it: images of an earlier revision are not these). An unset revision is in no dump, so images
    made before the field existed keep their digest."""
    chosen = cfg.model_dump(mode="json", include={*IMAGE_SETTINGS, "revision"})
    return digest({"settings": chosen, "inputs": inputs, "precision": precision})


def refuse_other_images(cfg: GenerateConfig, manifest: dict | None, inputs: dict) -> None:
    """Before the pipeline loads (minutes): a finished `out` whose images other settings or inputs made is
    refused, naming what differs (`committed_ids` refuses the batches of an unfinished one). The precision is
    compared as it resolved (`auto` then and `bf16` now may be one)."""
    if manifest is None:
        return
    was, now = manifest["config"], cfg.model_dump(mode="json")
    was = {**was, "precision": (manifest.get("metrics") or {}).get("precision", was.get("precision"))}
    now = {**now, "precision": resolve_precision(cfg.precision, resolve_device(cfg.device))}
    changed = [f"{key}: {was.get(key)} then, {now[key]} now" for key in (*IMAGE_SETTINGS, "precision")
               if was.get(key) != now[key]]
    changed += input_changes(manifest["inputs"], inputs)
    if changed:
        raise UserError(f"out {cfg.out} holds images made with other settings or inputs ({'; '.join(changed)}): "
                        "choose a new --out or remove it")


def committed_ids(out: str, settings: str) -> tuple[set, dict[str, pd.DataFrame]]:
    """The ids whose images a batch committed and `out` still holds, and those batches' rows by file name. An
    image deleted since (by hand, a copy cut short) is not done: its id is generated again, with its own seed.
    Images made with other settings (a rerun into the same `out` with other steps, seed or adapter) are
    refused, not taken as these: they would be scored as what the manifest then says."""
    batches = storage.join(out, "batches")
    parts = {name: parquet.read_frame(storage.read_bytes(storage.join(batches, name)))
             for name in storage.list_names(batches) if BATCH_PATH.fullmatch(f"batches/{name}")}
    for part in parts.values():
        # Batches written before rows recorded their settings carry none; those came from this stage's own
        # earlier attempt (a pipeline's key names its output).
        if "settings" in part and (part["settings"] != settings).any():
            raise UserError(f"out {out} holds images made with other settings, adapter or embeddings "
                            f"({', '.join(IMAGE_SETTINGS)}, precision or revision): choose a new --out or remove it")
    there = storage.list_tree(out) if parts else {}
    return {str(row.id) for part in parts.values() for row in part.itertuples() if is_there(row, there)}, parts


def is_there(row, there: dict[str, int]) -> bool:
    """Whether a batch row's image is in `out` (its listing, `there`) as written: at its recorded size."""
    return row.path in there and recorded_size(row) in (None, there[row.path])


def recorded_size(row) -> int | None:
    """The size a batch row records for its image; None in rows written before rows recorded it."""
    size = getattr(row, "bytes", None)
    return None if size is None or pd.isna(size) else int(size)


def image_path(row_id) -> str:
    """Where an id's image goes under `out`: the only name generate gives an image."""
    return f"images/{row_id}.png"


def own_images(cache_ids, parts: dict[str, pd.DataFrame]) -> set[str]:
    """The paths under `out` that are generate's images: those a batch's rows list, and `images/<id>.png` for
    every id of the embeddings cache. The second rule owns an image whose run was killed before its batch's rows
    committed (they list nothing yet); generate gives images no other name, and a file so named is one it
    overwrites anyway when it generates that id. Any other file under `images/` is not generate's."""
    return {image_path(i) for i in cache_ids} | {path for part in parts.values() for path in part["path"]}


def refuse_files_not_generated(out: str, images: set[str]) -> None:
    """Before any work: an `out` holding a file generate did not write is refused, naming it, since a rerun
    removes the images its result does not list and must never remove a user's file. Generate's own are
    `images` (`own_images`), `batches/batch-<hash>.parquet` and `generated.parquet`. Hidden files (a `.DS_Store`,
    a write's temporary file) are neither refused nor removed here (the temporary files of writes killed before
    their rename go when the lease is taken)."""
    def own(path: str) -> bool:
        return path == "generated.parquet" or path in images or bool(BATCH_PATH.fullmatch(path))

    refuse_foreign_files(out, "generate", "a rerun removes the images it no longer lists; give the images a folder "
                         "of their own", own=own)


def keep_only(out: str, ids, done: set, parts: dict[str, pd.DataFrame], images: set[str]) -> list[pd.DataFrame]:
    """Make `out` hold only what the new result can list, before generating: the old manifest and table go
    first, then the batch rows and images of ids outside this selection (a smaller limit, another split), so
    no image left there looks like part of a result it is not, and the rows of ids whose image is gone (not
    `done`), which are generated again. Only generate's own `images` are removed (a file put there since
    `refuse_files_not_generated` stays). Returns the batches' remaining rows."""
    withdraw(out, ["generated.parquet"])
    wanted, kept = {str(i) for i in ids} & done, []
    for name, part in parts.items():
        rows = part[part["id"].astype(str).isin(wanted)].reset_index(drop=True)
        if len(rows) < len(part):
            uri = storage.join(out, "batches", name)
            if len(rows):
                storage.write_bytes(uri, parquet.frame_bytes(rows))
            else:
                storage.delete(uri)
        kept.append(rows)
    # Not the images of ids it is about to generate (a killed attempt's, which no batch lists): overwritten anyway.
    unlisted = images - {path for rows in kept for path in rows["path"]} - {image_path(i) for i in ids}
    folder = storage.join(out, "images")
    stray = [name for name in storage.list_tree(folder) if f"images/{name}" in unlisted]
    if stray:
        storage.delete_objects(folder, stray)
        log.info("removed %d images of an earlier run that this selection does not include", len(stray))
    return kept


def run_generate(cfg: GenerateConfig) -> dict:
    """Images from the chosen rows' embeddings, one committed batch at a time, so a rerun generates only
    what is missing; returns the manifest, written last. Another run generating into the same `out` is waited
    for (it holds the lease), then found done; a run that fails before writing leaves no folder it made."""
    storage.check_output_folder(cfg.out, "--out")
    with folders.removed_if_left_empty(cfg.out), command_lease(cfg.out, "generate"):
        return _generate(cfg)


def _generate(cfg: GenerateConfig) -> dict:
    if cfg.adapter:  # before the pipeline, which may take minutes to load
        check_finished(adapter_folder(cfg.adapter))
    inputs = {"embeddings": cache_fingerprint(cfg.embeddings, "embeddings"),
              "adapter": adapter_identity(cfg.adapter) if cfg.adapter else None,
              "pipeline": pipeline_identity(cfg)}
    manifest = finished_manifest(cfg.out, "generate")
    refuse_other_kind(manifest, "generate", f"out {cfg.out}", "generated images",
                      "give the images a prefix of their own")
    if is_up_to_date(manifest, cfg.fingerprint(), inputs):
        log.info("%s is up to date; nothing to do", cfg.out)
        return read_manifest(cfg.out)
    refuse_other_images(cfg, manifest, inputs)
    table = read_embeddings(cfg.embeddings, "embeddings")
    ids, embeddings, scope = select_rows(cfg, table)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    settings = image_settings(cfg, inputs, precision)
    done, batches = committed_ids(cfg.out, settings)
    images = own_images(table.ids, batches)
    refuse_files_not_generated(cfg.out, images)  # before the pipeline loads (minutes), and before anything is removed
    cache_dim, cache_model = table.dim, table.model
    del table  # the chosen rows are copies: the whole cache need not stay in memory while generating
    pipe = load_unclip(cfg, device, precision)
    pipeline_dim = int(pipe.image_normalizer.mean.shape[-1])
    conditioning = Conditioning(cfg, cache_dim, cache_model, pipeline_dim)
    parts = keep_only(cfg.out, ids, done, batches, images)
    todo = [i for i, row_id in enumerate(ids) if str(row_id) not in done]
    log.info("%d ids of %s (%s conditioning, %d-D -> %d-D); %d already generated, skipped",
             len(ids), scope, conditioning.source, cache_dim, pipeline_dim, len(ids) - len(todo))
    progress = Progress(log, len(todo))
    started = time.monotonic()
    for start in range(0, len(todo), cfg.batch_size):
        rows = todo[start : start + cfg.batch_size]
        parts.append(generate_batch(cfg, pipe, conditioning, ids[rows], embeddings[rows], device, settings))
        progress.update(len(rows))
    seconds_now = time.monotonic() - started
    table = pd.concat(parts, ignore_index=True).sort_values("id", ignore_index=True)
    data = parquet.frame_bytes(table)
    storage.write_bytes(storage.join(cfg.out, "generated.parquet"), data)
    # Every image's share of its batch's time, summed: the whole set's generation time, however many
    # attempts it took (an attempt's own wall time would leave out what earlier ones generated).
    seconds = float(table["seconds"].sum()) if "seconds" in table and table["seconds"].notna().all() else None
    metrics = {"images": len(table), "generated_now": len(todo), "seconds_now": round(seconds_now, 2),
               "seconds": round(seconds, 2) if seconds is not None else None,
               "seconds_per_image": round(seconds / len(table), 4) if seconds is not None else None,
               "conditioning": conditioning.source, "precision": precision, "device": device.type}
    log.info("done: %d images (%d generated now, in %.1f s) -> %s", len(table), len(todo), seconds_now, cfg.out)
    # What the output holds, with sizes: a file deleted or cut short since makes it unfinished (`files_gone`).
    files = [{"path": "generated.parquet", "bytes": len(data)},
             *({"path": row.path, "bytes": recorded_size(row)} for row in table.itertuples())]
    return write_manifest(cfg.out, kind="generate", config=cfg.model_dump(mode="json"),
                          config_fingerprint=cfg.fingerprint(), inputs=inputs, rows=len(table),
                          conditioning=conditioning.source, metrics=metrics, files=files)


def generate_batch(cfg, pipe, conditioning: Conditioning, ids, embeddings, device, settings: str) -> pd.DataFrame:
    """One pipeline call for a batch; its PNGs, then its row file (the batch's commit), which records each
    image's share of the call's time."""
    started = time.monotonic()
    image_embeds = conditioning(embeddings).to(device=device, dtype=pipe.unet.dtype)
    seeds = [id_seed(cfg.seed, row_id) for row_id in ids]
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    result = pipe(prompt=[""] * len(ids), image_embeds=image_embeds, generator=generators,
                  num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, noise_level=cfg.noise_level,
                  output_type="np")
    # NaN pixels (an embed_norm so large the latents overflow) would be saved as black PNGs, and committed.
    finite = np.isfinite(result.images).reshape(len(ids), -1).all(axis=1)
    if not finite.all():
        raise UserError(f"the images of {int((~finite).sum())} id(s), e.g. {ids[int(np.argmin(finite))]}, came out "
                        f"NaN or infinite (embed_norm {cfg.embed_norm}, guidance {cfg.guidance}); nothing of this "
                        "batch is kept: use settings nearer the defaults")
    paths, sizes = [], []
    for row_id, image in zip(ids, pipe.numpy_to_pil(result.images), strict=True):
        path = image_path(row_id)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        storage.write_bytes(storage.join(cfg.out, path), buffer.getvalue())
        paths.append(path)
        sizes.append(len(buffer.getvalue()))
    seconds = (time.monotonic() - started) / len(ids)
    frame = pd.DataFrame({"id": ids, "path": paths, "bytes": sizes, "seed": seeds, "conditioning": conditioning.source,
                          "adapter": conditioning.fingerprint, "seconds": seconds, "settings": settings})
    first = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:12]
    storage.write_bytes(storage.join(cfg.out, "batches", f"batch-{first}.parquet"), parquet.frame_bytes(frame))
    return frame
