import pytest

from clipforge.config import load_config
from clipforge.config.adapter import AdapterConfig
from clipforge.errors import UserError
from clipforge.stages.adapter_trainer import global_batch_size

REQUIRED = {"clip_cache": "a", "target_cache": "b", "out": "c"}


def test_every_field_is_described_and_volatile_names_fields():
    for name, field in AdapterConfig.model_fields.items():
        assert field.description, name
    assert AdapterConfig.volatile <= set(AdapterConfig.model_fields)


def test_fingerprint_ignores_only_what_cannot_change_the_weights():
    base = load_config(AdapterConfig, REQUIRED)
    moved = load_config(AdapterConfig, {**REQUIRED, "out": "elsewhere", "num_processes": 4, "log_every": 1})
    assert moved.fingerprint() == base.fingerprint()
    for change in ({"lr": 0.5}, {"limit": 10}, {"seed": 1}, {"epochs": 2}, {"arch": "linear"}):
        assert load_config(AdapterConfig, {**REQUIRED, **change}).fingerprint() != base.fingerprint(), change


def test_all_problems_in_one_line():
    with pytest.raises(UserError) as err:
        load_config(AdapterConfig, {"clip_cache": "a", "epochs": 0, "lr": -1, "arch": "big", "colour": 1})
    message = str(err.value)
    assert "\n" not in message
    for key in ("target_cache", "out", "epochs", "lr", "arch", "colour: unknown key"):
        assert key in message


def test_some_loss_is_required():
    with pytest.raises(UserError, match="nothing to train"):
        load_config(AdapterConfig, {**REQUIRED, "cosine_weight": 0, "mse_weight": 0})


def test_infonce_alone_over_a_batch_of_one_row_is_refused_for_it_would_train_nothing():
    """One row has no negatives: InfoNCE is 0 whatever the weights, and the run 'trained' an untouched adapter."""
    alone = {**REQUIRED, "cosine_weight": 0, "mse_weight": 0, "contrastive_weight": 1}
    with pytest.raises(UserError, match="batch_size 1 leaves InfoNCE, the only loss term here, no negatives"):
        load_config(AdapterConfig, {**alone, "batch_size": 1})
    load_config(AdapterConfig, {**REQUIRED, "contrastive_weight": 1, "batch_size": 1})  # cosine and MSE train
    with pytest.raises(UserError, match="only 1 training row: InfoNCE"):
        global_batch_size(load_config(AdapterConfig, {**alone, "batch_size": 8}), train_rows=1, world=1)
    assert global_batch_size(load_config(AdapterConfig, {**alone, "batch_size": 8}), train_rows=3, world=1) == 3


def test_out_must_not_be_inside_a_cache_and_the_caches_must_differ():
    with pytest.raises(UserError, match="out caches/src/adapter is inside the clip_cache caches/src"):
        load_config(AdapterConfig, {"clip_cache": "caches/src/", "target_cache": "t", "out": "caches/src/adapter"})
    with pytest.raises(UserError, match="the same cache"):
        load_config(AdapterConfig, {"clip_cache": "s3://b/c", "target_cache": "s3://b/c/", "out": "o"})
    assert load_config(AdapterConfig, {"clip_cache": "caches/src", "target_cache": "t", "out": "caches/src-adapter"})


def test_evaluate_refuses_the_same_mistakes_in_one_line(capsys):
    from clipforge.cli import main

    for args, expected in ((["--target-cache", "c", "--out", "o"], "the same cache"),
                           (["--target-cache", "t", "--out", "c/eval"], "--out c/eval is inside the --clip-cache c")):
        assert main(["evaluate", "--clip-cache", "c", *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_takes_an_adapters_safetensors_as_its_folder():
    from clipforge.config.evaluate import EvaluateConfig

    for given, folder in (("runs/adp/adapter.safetensors", "runs/adp"), ("s3://b/adp/adapter.safetensors", "s3://b/adp"),
                          ("adapter.safetensors", "."), ("runs/adp", "runs/adp"), (None, None)):
        assert load_config(EvaluateConfig, {**REQUIRED, "out": "e", "adapter": given}).adapter == folder, given


def test_a_problem_names_where_its_value_came_from_a_flag_or_the_file(tmp_path, capsys):
    """Flags override the YAML file: a bad flag is the flag's, not the file's (it was all blamed on the file)."""
    from clipforge.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("clip_cache: a\ntarget_cache: b\nout: c\nepochs: 5\nlr: -1\ncolour: red\n")
    assert main(["train-adapter", "--config", str(bad), "--epochs", "0", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"clipforge train-adapter: error: --epochs: Input should be greater than or equal to 1 (got '0'); "
                   f"--batch-size: Input should be greater than or equal to 1 (got '0'); {bad}: lr: Input should be "
                   f"greater than 0 (got -1); {bad}: colour: unknown key\n")


def test_inf_and_nan_are_refused_by_name_not_trained_into_nan():
    """`--lr inf` parsed as a float, was logged as null, and trained to NaN; `weight_decay: .inf` in YAML too."""
    with pytest.raises(UserError) as err:
        load_config(AdapterConfig, {**REQUIRED, "lr": "inf", "weight_decay": float("inf"), "mse_weight": "nan"})
    for key in ("lr", "weight_decay", "mse_weight"):
        assert f"{key}: Input should be a finite number" in str(err.value)


def test_true_or_false_is_not_taken_for_a_number():
    """`epochs: true` in YAML was trained as 1 epoch; true/false stays right for the switches."""
    with pytest.raises(UserError, match="epochs: expected a number, got true"):
        load_config(AdapterConfig, {**REQUIRED, "epochs": True})
    assert load_config(AdapterConfig, {**REQUIRED, "compile": True}).compile is True
