"""The index stage: nsd_expdesign.mat -> the ids (and splits) one subject's caches encode."""

from __future__ import annotations

import logging

from clipforge.config.index import IndexConfig, subject_name
from clipforge.data.index import INDEX_FILE, index_file, read_index
from clipforge.data.nsd import nsd_index
from clipforge.errors import UserError
from clipforge.storage import parquet
from clipforge.storage import uri as storage
from clipforge.storage.manifest import (
    claim,
    finished_manifest,
    is_up_to_date,
    refuse_foreign_files,
    refuse_other_kind,
    withdraw,
    write_manifest,
)

log = logging.getLogger("clipforge.index")


def refuse_other_file(output: str) -> None:
    """An --output file already there is replaced only when it is an index (a rerun for other settings): a
    captions CSV or another table of the same name is the user's."""
    try:
        read_index(output)
    except UserError as exc:
        raise UserError(f"--output {output} is there and is not an index ({exc}); it is not replaced: give the "
                        "index a file name of its own") from None


def run_index(cfg: IndexConfig) -> dict:
    """Write the subject's index; under a prefix, commit it with a manifest (and skip when up to date)."""
    is_prefix = index_file(cfg.output) != cfg.output
    if is_prefix:
        storage.check_output_folder(cfg.output, "--output")
    elif storage.exists(cfg.output):
        refuse_other_file(cfg.output)
    inputs = {"expdesign": storage.fingerprint(cfg.expdesign, unsigned=cfg.no_sign_request)}
    manifest = finished_manifest(cfg.output, "index") if is_prefix else None
    refuse_other_kind(manifest, "index", f"output {cfg.output}", "an index", "give the index an output of its own")
    if is_up_to_date(manifest, cfg.fingerprint(), inputs):
        log.info("%s is up to date; nothing to do", cfg.output)
        return manifest
    if is_prefix:  # its index counts as its own only in an output an index stage claimed (`finished_manifest`)
        refuse_foreign_files(cfg.output, "index", "give the index a folder of its own (a dataset's folder is not one)",
                             results=(INDEX_FILE,), flag="--output")
    was = (manifest or {}).get("config", {})
    if manifest is not None and subject_name(str(was.get("subject"))) != subject_name(cfg.subject):  # another subject
        raise UserError(f"output {cfg.output} already holds the index of subject {was.get('subject')} (from "
                        f"{was.get('expdesign')}); choose a new --output")
    if manifest is not None:  # its manifest first: a rewrite killed half-way is never the old index's "done"
        log.info("%s: %s's index again (its expdesign file or settings changed)", cfg.output, cfg.subject)
        withdraw(cfg.output)
    frame = nsd_index(cfg.expdesign, cfg.subject, unsigned=cfg.no_sign_request)
    if cfg.output.endswith(".csv"):  # in the format its name says, as `read_index` reads it back
        data = frame.to_csv(index=False).encode()
    else:
        data = parquet.frame_bytes(frame)
    # An index written again as it was keeps its mtime: the caches made from it stay up to date.
    if is_prefix:
        claim(cfg.output)  # before the first write: its index there is this stage's (`refuse_foreign_files`)
    existed = storage.exists(index_file(cfg.output))
    written = storage.write_bytes_if_changed(index_file(cfg.output), data)
    if written and existed:
        log.warning("%s held another index, now replaced: caches made from it no longer match it",
                    index_file(cfg.output))
    counts = frame["split"].value_counts().to_dict()
    summary = {"rows": len(frame), "train": int(counts.get("train", 0)), "test": int(counts.get("test", 0))}
    log.info("%s: %d images (%d train, %d test) -> %s%s", cfg.subject, summary["rows"], summary["train"],
             summary["test"], index_file(cfg.output), "" if written else " (up to date: the file is left as it was)")
    if not summary["test"]:
        log.warning("none of %s's images is a shared one (sharedix): the test split is empty, and the adapter and "
                    "its evaluation need one", cfg.subject)
    if not is_prefix:
        return summary
    return write_manifest(cfg.output, kind="index", config=cfg.model_dump(mode="json"),
                          config_fingerprint=cfg.fingerprint(), inputs=inputs, rows=summary["rows"], metrics=summary,
                          files=[{"path": INDEX_FILE, "bytes": len(data)}])
