import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from clipforge.errors import UserError
from clipforge.models.adapter import safetensors_metadata
from clipforge.storage import uri as storage
from clipforge.storage.manifest import MANIFEST_NAME, write_manifest
from clipforge.train import checkpoint as ckpt
from clipforge.train.checkpoint import CheckpointStore, pack_state, unpack_state


def store(out, fingerprint="abc", keep=2, cls=CheckpointStore, **kwargs):
    return cls(str(out), config={"lr": 1.0}, config_fingerprint=fingerprint, inputs={"x": 1}, keep=keep, **kwargs)


def files(step):
    weights = pack_state({"w": torch.full((3,), float(step))})
    return {"model.safetensors": weights, "progress.json": b'{"step": %d}' % step}


def test_pack_state_round_trips_nested_state_without_pickle():
    state = {"a": {0: torch.arange(3), 1: (1.5, None, True)}, "b": [torch.tensor(2.0), "text", {"deep": 7}],
             "empty": torch.zeros(0), 3: "int key"}
    back = unpack_state(pack_state(state))
    assert back.keys() == state.keys()
    assert torch.equal(back["a"][0], state["a"][0]) and back["a"][1] == (1.5, None, True)
    assert back["b"][0].shape == () and back["b"][0].item() == 2.0 and back["b"][1:] == ["text", {"deep": 7}]
    assert back[3] == "int key" and back["empty"].numel() == 0
    with pytest.raises(TypeError, match="object"):
        pack_state({"bad": object()})


@pytest.mark.parametrize("dtype", [*ckpt.SAFETENSORS_DTYPES, torch.uint16, torch.float8_e4m3fn])
def test_every_dtype_round_trips_and_is_a_safetensors_file(dtype):
    """The fast writer for the usual dtypes, safetensors' own for the rest: either way safetensors reads it."""
    values = torch.arange(-6, 6).reshape(3, 4).T  # a transposed view: not contiguous
    values = values > 0 if dtype == torch.bool else values.abs().to(dtype) if not dtype.is_signed else values.to(dtype)
    state = {"x": values, "scalar": values[0, 0].clone(), "empty": values[:0], "shared": values}
    data = pack_state(state)
    back = unpack_state(data)
    for key in state:
        assert back[key].dtype == dtype and back[key].shape == state[key].shape
        assert torch.equal(back[key].reshape(-1).view(torch.uint8), state[key].reshape(-1).view(torch.uint8))
    assert sorted(safetensors.torch.load(bytes(data))) == [".empty", ".scalar", ".shared", ".x"]


def test_a_mixed_state_is_the_format_byte_for_byte():
    """Every dtype of the fast writer in one file (3-element slices leave later tensors unaligned), 0-dim, empty
    and non-contiguous tensors: exactly the bytes the format spells, so old and new checkpoints are one format."""
    grid = torch.arange(-6, 6).reshape(3, 4)
    state = {}
    for dtype, name in ckpt.SAFETENSORS_DTYPES.items():
        values = grid > 0 if dtype == torch.bool else grid.to(dtype)
        state[name] = {"t": values.T, "scalar": values[1, 2].clone(), "empty": values[:0], "odd": values[0, :3],
                       "stepped": values.reshape(-1)[::12]}  # one element, stride 12
    data = pack_state(state)

    tensors = {f".{name}.{part}": t.clone(memory_format=torch.contiguous_format)
               for name, parts in state.items() for part, t in parts.items()}
    header, body = {"__metadata__": safetensors_metadata(data)}, b""
    for key, t in tensors.items():
        header[key] = {"dtype": ckpt.SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [len(body), len(body) + t.numel() * t.element_size()]}
        body += t.reshape(-1).view(torch.uint8).numpy().tobytes()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    assert bytes(data) == len(head).to_bytes(8, "little") + head + body
    back = unpack_state(data)
    for name, parts in state.items():
        for part, t in parts.items():
            assert back[name][part].dtype == t.dtype and torch.equal(back[name][part], t)


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    twin = torch.nn.Linear(4, 2)
    twin.load_state_dict(unpack_state(pack_state(model.state_dict())))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.1)
    twin_opt.load_state_dict(unpack_state(pack_state(opt.state_dict())))
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight)


def test_keeps_the_newest_k_complete_checkpoints(tmp_path):
    s = store(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        s.save(step, files(step))
    assert [c.step for c in s.all()] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    latest = s.latest()
    assert latest.name == "step-000004" and latest.manifest["config"] == {"lr": 1.0}
    loaded = s.load(latest)
    assert unpack_state(loaded["model.safetensors"])["w"].tolist() == [4.0, 4.0, 4.0]


def test_incomplete_and_foreign_folders_are_ignored_then_tidied(tmp_path):
    s = store(tmp_path)
    s.save(2, files(2))
    root = tmp_path / "checkpoints"
    (root / "step-000009").mkdir()  # killed before its manifest
    (root / "step-000009" / "model.safetensors").write_bytes(b"partial")
    (root / ".tmp-step-000010-77").mkdir()  # killed before the rename
    store(tmp_path, fingerprint="other").save(50, files(50))  # another config's run
    assert s.latest().step == 2
    assert sorted(s.tidy()) == [".tmp-step-000010-77", "step-000009", "step-000050"]
    assert [p.name for p in root.iterdir()] == ["step-000002"]


def test_folders_clipforge_did_not_write_are_never_tidied_nor_resumed(tmp_path):
    """Only clipforge's own folders go: named as it names them and holding only checkpoint files. A user's
    folder (`my_run/`), a `step-N` one holding other files or a manifest clipforge did not write, or another
    stage's output, stays, is listed as foreign, and is never resumed from."""
    s = store(tmp_path)
    s.save(2, files(2))
    root = tmp_path / "checkpoints"
    for name, file, data in [("my_run", "model.pt", b"x"), ("step-000003", "model.pt", b"x"),
                             ("step-000004", MANIFEST_NAME, b'{"step": 4}'), ("step-000009", "notes", b"mine")]:
        (root / name).mkdir()
        (root / name / file).write_bytes(data)
    (root / "step-000004" / "model.safetensors").write_bytes(b"weights")
    (root / "step-000005").mkdir()
    write_manifest(str(root / "step-000005"), kind="adapter", config={}, config_fingerprint="abc", inputs={})
    (root / "step-000006").mkdir()  # a checkpoint cut short while a file of it was being written: clipforge's
    (root / "step-000006" / "model.safetensors").write_bytes(b"partial")
    (root / "step-000006" / ".rng.safetensors.k2j4x9.tmp").write_bytes(b"partial")  # as earlier versions named it
    (root / "step-000006" / f".config.json.k2j4x9ab{storage.TEMPORARY_SUFFIX}").write_bytes(b"partial")
    foreign = ["my_run", "step-000003", "step-000004", "step-000005", "step-000009"]
    assert s.latest().step == 2
    assert s.listing().foreign == foreign
    assert s.tidy() == ["step-000006"]
    assert sorted(p.name for p in root.iterdir()) == sorted([*foreign, "step-000002"])
    assert (root / "my_run" / "model.pt").read_bytes() == b"x"


def test_crash_before_the_manifest_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    s = store(tmp_path)
    s.save(1, files(1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for kill -9 between the files and the manifest

    monkeypatch.setattr(ckpt, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        s.save(2, files(2))
    monkeypatch.undo()
    assert s.latest().step == 1
    assert not (tmp_path / "checkpoints" / "step-000002").exists()


def test_half_pruned_folder_is_incomplete(tmp_path):
    s = store(tmp_path)
    s.save(1, files(1))
    s.save(2, files(2))
    # Pruning deletes the manifest first: a folder caught midway is no longer "complete".
    (tmp_path / "checkpoints" / "step-000002" / MANIFEST_NAME).unlink()
    assert s.latest().step == 1


def test_saving_the_same_step_again_replaces_it(tmp_path):
    s = store(tmp_path)
    s.save(5, files(5))
    s.save(5, files(6))
    assert unpack_state(s.load(s.latest())["model.safetensors"])["w"][0] == 6.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]
    # A kill between moving the old one aside and the rename leaves it as clipforge's, incomplete: tidied.
    aside = tmp_path / "checkpoints" / ".tmp-step-000005-123-old"
    shutil.copytree(tmp_path / "checkpoints" / "step-000005", aside)
    assert s.listing().incomplete == [aside.name] and s.tidy() == [aside.name] and not aside.exists()


def test_a_checkpoint_set_aside_by_a_save_of_its_step_that_was_killed_is_put_back(tmp_path):
    """Killed between the two renames: the committed step was set aside and the new one not yet in place. Both
    were tidied as incomplete, and with keep 1 the run began again from step 0."""
    s = store(tmp_path, keep=1)
    s.save(5, files(5))
    folder = tmp_path / "checkpoints"
    os.replace(folder / "step-000005", folder / ".tmp-step-000005-123-old")
    shutil.copytree(folder / ".tmp-step-000005-123-old", folder / ".tmp-step-000005-123")  # the new one, whole
    assert s.latest().step == 5
    assert unpack_state(s.load(s.latest())["model.safetensors"])["w"][0] == 5.0
    assert s.tidy() == [".tmp-step-000005-123"] and [p.name for p in folder.iterdir()] == ["step-000005"]


def test_corrupted_file_is_named(tmp_path):
    s = store(tmp_path)
    s.save(1, files(1))
    (tmp_path / "checkpoints" / "step-000001" / "progress.json").write_bytes(b"{}")
    with pytest.raises(UserError, match="progress.json"):
        s.load(s.latest())


def test_s3_checkpoints_upload_committed_folders_and_resume_downloads(s3_bucket, tmp_path):
    out = f"s3://{s3_bucket}/run"
    s = store(out, keep=2, work_dir=tmp_path / "work")
    for step in (1, 2, 3):
        s.save(step, files(step))
    remote = f"{out}/checkpoints"
    assert storage.list_folders(remote) == ["step-000002", "step-000003"]
    assert storage.list_names(f"{remote}/step-000001") == []
    manifest = storage.read_json(f"{remote}/step-000003/{MANIFEST_NAME}")
    assert manifest["step"] == 3 and {f["path"] for f in manifest["files"]} == set(files(3))
    # An upload cut short (no manifest) is ignored.
    storage.write_bytes(f"{remote}/step-000007/model.safetensors", b"partial")
    fresh = store(out, keep=2, work_dir=tmp_path / "elsewhere")
    latest = fresh.latest()
    assert latest.step == 3
    loaded = fresh.load(latest)
    assert json.loads(loaded["progress.json"]) == {"step": 3}
    assert (tmp_path / "elsewhere" / "checkpoints" / "step-000003" / MANIFEST_NAME).is_file()
    assert fresh.tidy() == ["step-000007"]
    assert storage.list_names(f"{remote}/step-000007") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="here CUDA would page-lock the memory")
def test_a_snapshot_falls_back_to_pageable_memory_when_none_can_be_page_locked(caplog):
    """Without CUDA (as where a host refuses to lock more memory) page-locking fails: the snapshot is still
    taken, in pageable memory, with a warning."""
    with caplog.at_level("WARNING"):
        buffer = ckpt._host_buffer(1 << 20, pinned=True)
    assert buffer.numel() == 1 << 20 and not buffer.is_pinned()
    assert "cannot page-lock 1 MB" in caplog.text
