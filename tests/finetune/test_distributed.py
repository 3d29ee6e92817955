"""Two real worker processes on CPU (torchrun, gloo), started by `--num-processes 2` itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_fixtures import config_args, max_abs_diff, model_weights, settings

from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import EXIT_USER_ERROR
from clipforge.stages.finetune import finetune

pytestmark = pytest.mark.slow

# A clip that binds (the gradients' norm is ~8): the gradients' scale shows in the weights, as Adam's alone would not.
RUN = dict(epochs=3, timestamped=False, workers=1, grad_clip=0.1)


def run(tiny_clip, captioned, out, **overrides):
    args = config_args(settings(tiny_clip, captioned, out, num_processes=2, **{**RUN, **overrides}))
    proc = subprocess.run([sys.executable, "-m", "clipforge.cli", "finetune", *args], text=True, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return proc.returncode, proc.stderr


def test_two_processes_train_the_weights_of_one(tiny_clip, captioned, tmp_path):
    one = finetune(FinetuneConfig(**settings(tiny_clip, captioned, tmp_path / "one", **RUN)))
    code, log = run(tiny_clip, captioned, tmp_path / "two")
    assert code == 0, log
    assert "starting 2 processes" in log
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["steps"] == one.metrics["steps"] and two["timing"]["processes"] == 2
    # The contrastive loss sees the global batch of 16 on both ranks: the same figures, the same weights.
    assert two["final"]["image_to_text_R@1"] == one.metrics["final"]["image_to_text_R@1"]
    assert two["final"]["val_loss"] == pytest.approx(one.metrics["final"]["val_loss"], abs=1e-4)
    weights = [model_weights(tmp_path / name / "model.pt") for name in ("one", "two")]
    assert max_abs_diff(*weights, key_biases=False) <= 5e-6  # 2.8e-5 when logit_scale's gradient was doubled
    # Only rank 0 writes: one set of TensorBoard events.
    assert len(list((tmp_path / "two" / "logs").iterdir())) == 1


def test_a_bad_image_met_by_one_worker_ends_the_launcher_with_its_name(tiny_clip, captioned, tmp_path):
    train, val = captioned
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    header, *rows = Path(train).read_text().splitlines()
    bad_train = tmp_path / "train.csv"  # image paths made absolute: the CSV is elsewhere now
    absolute = [f"{Path(train).parent / row}" for row in rows]
    bad_train.write_text("\n".join([header, f"{broken},a red circle", *absolute]) + "\n")
    code, log = run(tiny_clip, (str(bad_train), val), tmp_path / "out", epochs=1, warmup=1000)
    assert code == EXIT_USER_ERROR, log
    assert log.count("warmup of 1000 steps is not shorter than the run") == 1, log  # said once, not per rank
    last = log.strip().splitlines()[-1]
    assert last.startswith("clipforge finetune: error: image ") and "broken.png" in last
    assert "cannot be decoded" in last and "Traceback" not in log
    assert not (tmp_path / "out" / "_manifest.json").exists()
