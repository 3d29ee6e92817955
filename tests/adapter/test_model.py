import pytest
import safetensors.torch
import torch

from clipforge.errors import UserError
from clipforge.models.adapter import AdapterSpec, adapter_bytes, build_adapter, load_adapter


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_output_is_unit_length_in_the_target_dimension(arch):
    model = build_adapter(AdapterSpec(arch, 16, 32, hidden_dim=24, depth=2, dropout=0.1)).eval()
    out = model(torch.randn(5, 16))
    assert out.shape == (5, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_load_adapter_round_trip_from_folder_and_file(tmp_path):
    spec = AdapterSpec("mlp", 16, 32, hidden_dim=24, depth=1, dropout=0.2)
    torch.manual_seed(0)
    model = build_adapter(spec).eval()
    (tmp_path / "adapter.safetensors").write_bytes(adapter_bytes(model, spec))
    x = torch.randn(4, 16)
    for where in (tmp_path, tmp_path / "adapter.safetensors", str(tmp_path)):
        loaded = load_adapter(where)
        assert not loaded.training and loaded.spec == spec
        assert torch.equal(loaded(x), model(x))
    # Plain safetensors: any reader gets the tensors without running code.
    assert set(safetensors.torch.load_file(tmp_path / "adapter.safetensors")) == set(model.state_dict())


def test_load_adapter_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_adapter(tmp_path)
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not an adapter"):
        load_adapter(tmp_path / "other.safetensors")


def test_load_adapter_refuses_an_output_whose_training_did_not_finish(tmp_path):
    """An adapter folder being trained (checkpoints, no `_manifest.json`) may hold an older run's files:
    refused, naming the folder, also when the weights file is given."""
    from clipforge.storage.manifest import write_manifest

    spec = AdapterSpec("linear", 4, 8)
    expected = (f"{tmp_path} is incomplete (no _manifest.json): its training did not finish; "
                "run train-adapter again to resume it")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError) as refused:  # retraining: the old files are gone, checkpoints are being made
        load_adapter(tmp_path)
    assert str(refused.value) == expected
    (tmp_path / "checkpoints").rmdir()
    (tmp_path / "adapter.safetensors").write_bytes(adapter_bytes(build_adapter(spec), spec))
    (tmp_path / "adapter.json").write_text("{}")
    assert load_adapter(tmp_path).spec == spec  # weights and card without checkpoints: a finished adapter copied
    (tmp_path / "checkpoints").mkdir()  # ... and with them: an older layout's retrain, killed, its old files left
    for where in (tmp_path, tmp_path / "adapter.safetensors", str(tmp_path)):
        with pytest.raises(UserError) as refused:
            load_adapter(where)
        assert str(refused.value) == expected
    write_manifest(str(tmp_path), kind="adapter", config={}, config_fingerprint="t", inputs={})
    assert load_adapter(tmp_path).spec == spec


def test_unknown_arch():
    with pytest.raises(UserError, match="linear, mlp"):
        build_adapter(AdapterSpec("transformer", 2, 2))
