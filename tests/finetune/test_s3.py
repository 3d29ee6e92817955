"""Data and output on S3 (a moto server on loopback): images read by forked loader workers, checkpoints, events
and the commit uploaded, the run listed and found again by `--resume latest`."""

from pathlib import Path

from finetune_fixtures import settings

from clipforge.cli import main
from clipforge.config.finetune import FinetuneConfig
from clipforge.stages.finetune import finetune
from clipforge.storage import uri as storage


def test_s3_data_and_output(tiny_clip, captioned, s3_bucket, tmp_path, capsys):
    root = Path(captioned[0]).parent
    data = f"s3://{s3_bucket}/data"
    for path in root.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{data}/{path.relative_to(root).as_posix()}", path.read_bytes())
    out = f"s3://{s3_bucket}/models"
    config = FinetuneConfig(**settings(tiny_clip, (f"{data}/train.csv", f"{data}/val.csv"), out, epochs=2,
                                       workers=2, work_dir=str(tmp_path / "work")))
    result = finetune(config)
    assert result.status == "trained" and result.out.startswith(f"{out}/")
    names = set(storage.list_names(result.out))
    assert {"model.pt", "model.json", "metrics.json", "_manifest.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in storage.list_names(f"{result.out}/logs"))
    assert result.metrics["final"]["val_loss"] < result.metrics["before"]["val_loss"]
    assert not (tmp_path / "work" / "checkpoints").exists()  # the local copies go once the run is on S3

    assert main(["models", "list", "--dir", out]) == 0
    assert result.out.rsplit("/", 1)[-1] in capsys.readouterr().out
    again = finetune(config.model_copy(update={"resume": "latest"}))
    assert again.status == "up to date" and again.out == result.out
