"""The `finetune` pipeline kind: the finetune stage of jobs/demo.yaml run by the local runner (split and
augment inside the stage, output straight under the content-addressed prefix), then up to date."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from finetune_fixtures import MODEL

from clipforge.data.synthetic import write_captioned_dataset
from clipforge.orchestrate.local import run_spec

pytestmark = pytest.mark.slow

DEMO = Path(__file__).parents[2] / "jobs" / "demo.yaml"


def test_the_demo_spec_runs_and_then_is_up_to_date(tiny_clip, tmp_path, monkeypatch):
    # The inputs the demo names, where it names them (relative to the working directory).
    monkeypatch.chdir(tmp_path)
    write_captioned_dataset(tmp_path / "demo" / "captioned", 60, size=64, seed=1)
    models = tmp_path / "demo" / "models"
    models.mkdir()
    _, config, weights = tiny_clip
    shutil.copy(weights, models / "tiny-clip.pt")
    (models / "tiny-clip.json").write_text(Path(config).read_text())
    quick = ["stages.finetune.with.epochs=2", "stages.finetune.with.workers=0", "stages.finetune.with.batch_size=16"]
    # The demo's finetune stage as shipped; the whole demo is tests/orchestrate/test_local_runner.py's.
    demo = yaml.safe_load(DEMO.read_text())
    demo["stages"] = [s for s in demo["stages"] if s["kind"] == "finetune"]
    spec = tmp_path / "finetune-only.yaml"
    spec.write_text(yaml.safe_dump(demo))

    record = run_spec(str(spec), quick, run_id="first")
    stage = record.stage("finetune")
    assert stage["status"] == "done", stage
    out = tmp_path / stage["output"]  # relative to the working directory, as the spec's `artifacts`
    assert out.parent == tmp_path / "demo" / "artifacts" / "finetune"
    # Straight under the stage's prefix: no timestamped run folder inside it.
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "model.json", "_manifest.json", "data", "checkpoints", "logs"} <= names
    data = json.loads((out / "data" / "_manifest.json").read_text())
    assert data["metrics"]["train"] == 48 and data["metrics"]["val"] == 12 and data["metrics"]["variants"] > 0
    card = json.loads((out / "model.json").read_text())
    assert card["data"]["train_rows"] == 48 + data["metrics"]["variants"] and card["data"]["val_rows"] == 12
    assert card["model"] == "tiny-clip" and MODEL != "tiny-clip"

    again = run_spec(str(spec), quick, run_id="second")
    assert again.stage("finetune")["status"] in ("up-to-date", "reused")
    assert tmp_path / again.stage("finetune")["output"] == out

    # An image replaced under its own name (the spec names the dataset by its index.csv): a new model, whose
    # manifest says so to the stages that use it (a folder index by it is then not reused either).
    from PIL import Image

    first_image = (tmp_path / "demo" / "captioned" / "index.csv").read_text().splitlines()[1].split(",")[0]
    Image.new("RGB", (64, 64), "orange").save(tmp_path / "demo" / "captioned" / first_image)
    third = run_spec(str(spec), quick, run_id="third")
    assert third.stage("finetune")["status"] == "done"
    retrained = tmp_path / third.stage("finetune")["output"]
    assert retrained != out
    inputs = [json.loads((o / "_manifest.json").read_text())["inputs"] for o in (out, retrained)]
    assert inputs[0]["images"] != inputs[1]["images"]
