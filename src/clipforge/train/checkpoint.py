"""Training checkpoints: folders `OUT/checkpoints/step-000123/` that are complete or ignored.

Protocol (STYLE.md §4): a checkpoint's files are written first and its
`_manifest.json` (step, config, config fingerprint, input fingerprints, file
sizes and hashes) last. On disk the folder is assembled under a temporary name
and renamed into place after its manifest is in, so a crash leaves either a
whole checkpoint or a `.tmp-*` folder that is never read. On S3 (no rename) the
folder is assembled in a local working directory, committed there, then
uploaded file by file with the manifest last; resume downloads the newest
complete one. Pruning deletes a manifest before the files it lists, so a
half-deleted folder is incomplete, never corrupt.

Only clipforge's own folders are ever removed: `step-N/` or `.tmp-step-N-PID/` holding
nothing but checkpoint files. Anything else under `checkpoints/` (a user's `my_run/`) is
`foreign`, never read and never deleted.

Everything is safetensors + JSON: `pack_state` turns any nested state (model,
optimizer, RNG, progress) into one safetensors file and `unpack_state` back,
without pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from clipforge.errors import UserError
from clipforge.models.adapter import safetensors_metadata
from clipforge.storage import uri as storage
from clipforge.storage.manifest import MANIFEST_NAME, read_manifest, write_manifest
from clipforge.train.checkpoint_names import (
    ASIDE_PATTERN,
    CHECKPOINTS_DIR,
    NAME_PATTERN,
    TEMP_PATTERN,
    aside_name,
    checkpoint_name,
    temp_name,
)

log = logging.getLogger(__name__)

SKELETON_KEY = "clipforge_state"


# -- nested state <-> safetensors ---------------------------------------------------------------


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    match obj:
        case torch.Tensor():
            # Left where it is (a CUDA tensor stays on the GPU): pack_state copies its bytes into the file
            # before it returns, so that copy is the snapshot and training cannot change it afterwards.
            tensors[path] = obj.detach().contiguous()
            return {"t": path}
        case dict():
            # Keys keep their type (optimizer state is keyed by int).
            return {"d": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
        case tuple():
            return {"u": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
        case list():
            return {"l": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
        case None | bool() | int() | float() | str():
            return {"v": obj}
        case _:
            raise TypeError(f"cannot store {type(obj).__name__} at {path or 'top level'} in a checkpoint")


def _decode(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    (tag, value), = node.items()
    match tag:
        case "t":
            return tensors[value]
        case "d":
            return {k: _decode(v, tensors) for k, v in value}
        case "u":
            return tuple(_decode(v, tensors) for v in value)
        case "l":
            return [_decode(v, tensors) for v in value]
        case "v":
            return value
    raise ValueError(f"unknown state tag {tag!r}")


def pack_state(state: Any) -> memoryview | bytes:
    """One safetensors file holding nested dicts/lists/tuples of tensors and JSON scalars (bytes-like: written
    and hashed as it is, never copied once more).

    Tensors may be on the CPU or a GPU; the file is the same either way. Every byte is copied before this
    returns, so the file is a snapshot: training may go on changing the tensors at once."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "", tensors)
    metadata = {SKELETON_KEY: json.dumps(skeleton)}
    if all(t.dtype in SAFETENSORS_DTYPES for t in tensors.values()):
        return _safetensors_bytes(tensors, metadata)
    # safetensors' own writer takes CPU tensors only, and no two sharing memory: a fresh CPU copy of each.
    return safetensors.torch.save({k: t.to("cpu", copy=True) for k, t in tensors.items()}, metadata=metadata)


# The dtypes a checkpoint holds (weights, optimizer moments, steps, RNG states), by safetensors' names.
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> memoryview:
    """The safetensors file of these tensors (CPU or CUDA), each copied once, from where it lives, into its
    slice of one buffer.

    The buffer is a torch tensor: not zero-filled first, as a `bytearray` is, and page-locked when any tensor
    is on a GPU, so that the copies run at the bus's speed. For ViT-B-32's 1.8 GB of weights and AdamW
    moments on an H200 (bench/device/snapshot.py) the snapshot took 1.79 s into a `bytearray` (0.92 s of it
    zero-filling) and 0.035 s into page-locked memory: training stops that long for each checkpoint. The cost:
    torch keeps freed page-locked blocks for their next use, each rounded up to a power of two, for the
    process's life: a ViT-B-32 fine-tune holds 3 GiB locked for its 1.8 GB files (twice that when a commit
    is still running at the next snapshot), and pays for locking only at its first checkpoints. Layout (the
    format's spec): 8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, then
    the tensors' bytes back to back in the header's order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    gpus = {t.device for t in tensors.values() if t.device.type == "cuda"}
    buffer = _host_buffer(8 + len(head) + offset, pinned=bool(gpus))
    out = buffer.numpy()
    out[:8] = np.frombuffer(len(head).to_bytes(8, "little"), dtype=np.uint8)
    out[8 : 8 + len(head)] = np.frombuffer(head, dtype=np.uint8)
    base = 8 + len(head)
    for name, tensor in tensors.items():
        start, end = header[name]["data_offsets"]
        if end > start:  # reshape first: a 0-dim tensor has no last dimension for view() to reinterpret
            flat = tensor.reshape(-1)
            if flat.stride(-1) != 1:  # one element taken with a step counts as contiguous, yet keeps its stride
                flat = flat.clone(memory_format=torch.contiguous_format)
            buffer[base + start : base + end].copy_(flat.view(torch.uint8), non_blocking=True)
    for gpu in gpus:  # the copies from a GPU were queued on its stream: in place once it gets there
        torch.cuda.synchronize(gpu)
    return memoryview(out)


def _host_buffer(size: int, pinned: bool) -> torch.Tensor:
    """`size` bytes of host memory, page-locked if asked and the system grants it (a host that cannot lock
    that much still checkpoints, at the pageable copy's speed)."""
    if pinned:
        try:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:  # cudaHostAlloc refused: out of lockable memory
            log.warning("cannot page-lock %.0f MB for a checkpoint's snapshot (%s); copying to pageable memory",
                        size / 1e6, str(exc).splitlines()[0])
    return torch.empty(size, dtype=torch.uint8)


def unpack_state(data: bytes | bytearray | memoryview) -> Any:
    """The exact inverse of `pack_state` (tensors on the CPU)."""
    skeleton = json.loads(safetensors_metadata(data)[SKELETON_KEY])
    return _decode(skeleton, safetensors.torch.load(data if isinstance(data, bytes) else bytes(data)))


# -- the store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its step, its folder's URI and its manifest."""

    step: int
    uri: str
    manifest: dict

    @property
    def name(self) -> str:
        return checkpoint_name(self.step)


@dataclass(frozen=True)
class Listing:
    """What `OUT/checkpoints/` holds, folder by folder (each list by name order, `ours` oldest first)."""

    ours: list[Checkpoint]  # this run's complete checkpoints
    others: list[Checkpoint]  # complete checkpoints of another config or other inputs
    incomplete: list[str]  # clipforge's folders cut short: `.tmp-*`, a checkpoint without its manifest
    foreign: list[str]  # folders clipforge did not write there: left alone


# A checkpoint holds safetensors and JSON only; killed mid-write, also `write_bytes`'s temporary file of one
# (`.NAME.XXXXXXXX.clipforge-tmp`; `.tmp` as earlier versions named it).
CHECKPOINT_FILE = re.compile(r"^[^/.][^/]*\.(safetensors|json)$"
                             r"|^\.[^/]+\.(safetensors|json)\.[^/.]+\.(clipforge-)?tmp$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remove_folder(uri: str) -> None:
    """Manifest first, so that an interrupted removal leaves an incomplete folder, not a broken 'complete' one."""
    storage.delete(storage.join(uri, MANIFEST_NAME))
    storage.delete_tree(uri)


def _holds_checkpoint_files_only(uri: str) -> bool:
    """Whether a folder without a manifest holds nothing a checkpoint would not (a user's `model.pt`, a
    subfolder): only then is it a checkpoint cut short, which may go."""
    return all(CHECKPOINT_FILE.match(path) for path in storage.list_tree(uri))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """The checkpoints of one training run under `OUT/checkpoints/`, local or on S3.

    Only checkpoints whose manifest matches `config_fingerprint` and `inputs` are
    this run's; `tidy()` removes other runs' and incomplete ones, never a folder
    clipforge did not write. Writes happen on one process (rank 0);
    every process may read. `work_dir` is the local staging area when OUT is on
    S3 (default: a folder under the system temp dir named after OUT).
    """

    def __init__(self, out: str, *, config: dict, config_fingerprint: str, inputs: dict, keep: int = 2,
                 work_dir: str | Path | None = None):
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.root = storage.join(out, CHECKPOINTS_DIR)
        self.remote = storage.is_s3(out)
        self.config, self.config_fingerprint, self.inputs, self.keep = config, config_fingerprint, inputs, keep
        if self.remote:
            base = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "clipforge-work" / _sha256(
                out.encode())[:12]
            self.local_root = base / CHECKPOINTS_DIR
        else:
            self.local_root = storage.local_path(self.root)

    def _matches(self, manifest: dict) -> bool:
        return manifest.get("config_fingerprint") == self.config_fingerprint and manifest.get("inputs") == self.inputs

    def listing(self) -> Listing:
        """Every folder under the root, sorted into this run's checkpoints, other runs', clipforge's incomplete
        ones and foreign ones."""
        ours, others, incomplete, foreign = [], [], [], []
        for name in self._restore_set_aside(storage.list_folders(self.root)):
            uri = storage.join(self.root, name)
            match = NAME_PATTERN.match(name)
            try:
                manifest = read_manifest(uri) if match else None
            except UserError:  # a `_manifest.json` clipforge did not write: not its checkpoint
                foreign.append(name)
                continue
            if manifest is None:
                mine = (match or TEMP_PATTERN.match(name)) and _holds_checkpoint_files_only(uri)
                (incomplete if mine else foreign).append(name)
            elif manifest.get("kind") != "checkpoint":
                foreign.append(name)
            else:
                found = Checkpoint(int(match.group(1)), uri, manifest)
                (ours if self._matches(manifest) else others).append(found)
        return Listing(sorted(ours, key=lambda c: c.step), others, incomplete, foreign)

    def _restore_set_aside(self, names: list[str]) -> list[str]:
        """`names`, after putting back a committed checkpoint that a kill caught set aside: between the two
        renames of saving its step again, neither folder had the step's name, and both were tidied as
        incomplete (with keep 1, training began again from step 0)."""
        if self.remote:  # the store's copy was never set aside
            return names
        for name in [n for n in names if ASIDE_PATTERN.match(n)]:
            step = ASIDE_PATTERN.match(name).group(1)
            path = self.local_root / name
            try:
                if step not in names and read_manifest(str(path)) is not None:
                    os.replace(path, self.local_root / step)
                    names = [step if n == name else n for n in names]
                    log.info("put back checkpoint %s, set aside when a save of its step was interrupted", step)
            except (UserError, OSError):  # not clipforge's, or another process put it back first
                continue
        return names

    def all(self) -> list[Checkpoint]:
        """This run's complete checkpoints, oldest first."""
        return self.listing().ours

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint of this run, or None: what a rerun resumes from."""
        ours = self.all()
        return ours[-1] if ours else None

    def tidy(self, listing: Listing | None = None) -> list[str]:
        """Remove clipforge's incomplete folders and checkpoints of another config or other inputs (as `listing`
        found them, by default as they are now); returns their names. Foreign folders stay.

        Call on one process before training starts, never while another process saves.
        """
        listing = listing or self.listing()
        stale = sorted([*listing.incomplete, *(c.name for c in listing.others)])
        for name in stale:
            _remove_folder(storage.join(self.root, name))
        if self.remote and self.local_root.is_dir():
            for path in self.local_root.iterdir():
                ours = NAME_PATTERN.match(path.name) or TEMP_PATTERN.match(path.name)
                if ours and path.is_dir() and (path.name.startswith(".tmp-") or not (path / MANIFEST_NAME).is_file()):
                    shutil.rmtree(path, ignore_errors=True)
        return stale

    def _commit_local(self, folder: Path, files: dict[str, bytes], step: int) -> dict:
        """Write `files` then the manifest into a temp folder, then rename it to `folder`."""
        tmp = folder.parent / temp_name(folder.name, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            storage.write_bytes(str(tmp / name), data)
        listing = [{"path": name, "bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()]
        manifest = write_manifest(str(tmp), kind="checkpoint", config=self.config,
                                  config_fingerprint=self.config_fingerprint, inputs=self.inputs, step=step,
                                  files=listing)
        if not folder.exists():
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
            return manifest
        # The same step saved again (the final checkpoint of a resumed run): the old one goes aside by a rename,
        # not removed first, so that no checkpoint of this step is there for two renames, not for a removal of GBs.
        aside = folder.parent / aside_name(folder.name, os.getpid())
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(folder, aside)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return manifest

    def save(self, step: int, files: dict[str, bytes]) -> Checkpoint:
        """Commit a checkpoint of `step` holding `files` (name -> bytes), then keep only the newest `keep`."""
        name = checkpoint_name(step)
        manifest = self._commit_local(self.local_root / name, files, step)
        uri = storage.join(self.root, name)
        if self.remote:
            remote_manifest = storage.join(uri, MANIFEST_NAME)
            if storage.exists(remote_manifest):
                storage.delete(remote_manifest)
            for file_name in files:  # from the local copy just committed: a second copy in memory costs GBs
                storage.upload_file(self.local_root / name / file_name, storage.join(uri, file_name))
            storage.write_bytes(remote_manifest, (self.local_root / name / MANIFEST_NAME).read_bytes())
        self.prune()
        return Checkpoint(step, uri, manifest)

    def drop_local_copies(self) -> None:
        """Once the run is committed, the working copies of checkpoints kept on S3 serve nothing: remove them
        (a large model leaves gigabytes per checkpoint on the machine otherwise)."""
        if self.remote:
            shutil.rmtree(self.local_root, ignore_errors=True)

    def prune(self) -> None:
        """Delete all but the newest `keep` checkpoints of this run (and their local copies)."""
        for old in self.all()[: -self.keep]:
            _remove_folder(old.uri)
            if self.remote:
                _remove_folder(str(self.local_root / old.name))

    def load(self, checkpoint: Checkpoint) -> dict[str, bytes]:
        """A checkpoint's files (name -> bytes), each checked against the manifest's hash.

        From S3 the folder is first downloaded into the working directory with
        the same commit protocol, and reused from there if already complete.
        """
        if self.remote:
            folder = self.local_root / checkpoint.name
            local = read_manifest(str(folder))
            if local is None or local.get("files") != checkpoint.manifest["files"]:
                files = {f["path"]: storage.read_bytes(storage.join(checkpoint.uri, f["path"]))
                         for f in checkpoint.manifest["files"]}
                self._verify(checkpoint, files)
                self._commit_local(folder, files, checkpoint.step)
                return files
        else:
            folder = storage.local_path(checkpoint.uri)
        files = {f["path"]: (folder / f["path"]).read_bytes() for f in checkpoint.manifest["files"]}
        self._verify(checkpoint, files)
        return files

    @staticmethod
    def _verify(checkpoint: Checkpoint, files: dict[str, bytes]) -> None:
        for entry in checkpoint.manifest["files"]:
            if _sha256(files[entry["path"]]) != entry["sha256"]:
                raise UserError(f"checkpoint {checkpoint.uri}: {entry['path']} does not match its manifest "
                                "(corrupted); delete that folder to resume from the one before")
