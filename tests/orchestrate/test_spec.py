"""Pipeline specs: every shipped one validates; every mistake is named by stage and key."""

import datetime
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from clipforge.cli import main
from clipforge.config.pipeline import load_pipeline, order_stages, pipeline_json_schema
from clipforge.errors import UserError

JOBS = sorted(Path(__file__).parents[2].joinpath("jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_specs_validate(path):
    spec = load_pipeline(str(path))
    assert order_stages(spec)
    jsonschema.validate(yaml.safe_load(path.read_text()), pipeline_json_schema())


def write(tmp_path, spec: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def base_spec() -> dict:
    return {
        "artifacts": "artifacts",
        "stages": [
            {"name": "idx", "kind": "index", "with": {"expdesign": "e.mat", "subject": "subj01"}},
            {"name": "src", "kind": "cache", "needs": ["idx"],
             "with": {"source": "s.hdf5", "index": "idx", "model": "ViT-B-32", "pretrained": "openai"}},
            {"name": "tgt", "kind": "cache", "needs": ["idx"],
             "with": {"source": "s.hdf5", "index": "idx", "model_id": "stabilityai/stable-diffusion-2-1"}},
            {"name": "ad", "kind": "adapter", "needs": ["src", "tgt"],
             "with": {"clip_cache": "src", "target_cache": "tgt"}},
        ],
    }


def mutate(change):
    spec = base_spec()
    change(spec)
    return spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["stages"][1]["with"].update(batchsize=3), "stages.src.with.batchsize: unknown key"),
        (lambda s: s["stages"][1]["with"].update(batch_size="many"), "stages.src.with.batch_size"),
        (lambda s: s["stages"][3].update(kind="train"), "stages.ad.kind: unknown kind 'train'"),
        (lambda s: s["stages"][3].update(needs=["src", "nope"]), "stages.ad.needs: no stage named 'nope'"),
        (lambda s: s["stages"][0].update(needs=["ad"]), "needs form a cycle"),
        (lambda s: s["stages"][3].update(needs=["src"]), "stages.ad.with.target_cache: refers to stage 'tgt'"),
        (lambda s: s["stages"][3]["with"].update(clip_cache="idx") or s["stages"][3]["needs"].append("idx"),
         "stage 'idx' is a index; expected cache"),
        (lambda s: s["stages"][1]["with"].update(output="x"), "stages.src.with.output: set by the pipeline"),
        (lambda s: s.update(extra=1), "extra: unknown key"),
        (lambda s: s["stages"][3]["with"].update({"batch-size": 64}),
         "stages.ad.with.batch-size: unknown key; did you mean batch_size?"),
        (lambda s: s["stages"][2].update(name="src"), "stages.src: the name is used more than once"),
        (lambda s: s["stages"][3].update(policy={"on_failure": "retry"}), "stages.ad.policy.on_failure"),
        (lambda s: s.update(artifacts=" "), "artifacts: must name a folder or s3://bucket/prefix"),
        (lambda s: s.update(stages=3), "stages: Input should be a valid list"),
        (lambda s: s["stages"][1].update(resources={"memory": "32GB"}),
         "stages.src.resources.memory: '32GB' is not a Kubernetes quantity"),
        (lambda s: s["stages"][1].update(resources={"cpu": "1.5 cores"}), "stages.src.resources.cpu: '1.5 cores'"),
        (lambda s: s["stages"][3]["with"].update(clip_cache="sr"),
         "stages.ad.with.clip_cache: 'sr' is neither a stage of this spec nor an existing path; did you mean 'src'?"),
    ],
)
def test_spec_errors_name_stage_and_key(tmp_path, change, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_pipeline(write(tmp_path, mutate(change)))


def test_cpu_and_memory_are_written_as_in_any_kubernetes_manifest(tmp_path):
    spec = mutate(lambda s: s["stages"][1].update(resources={"cpu": 8, "memory": "32Gi", "gpus": 1}))
    resources = load_pipeline(write(tmp_path, spec)).stages[1].resources
    assert (resources.cpu, resources.memory) == ("8", "32Gi")


def test_all_problems_are_reported_at_once(tmp_path):
    spec = mutate(lambda s: (s["stages"][1]["with"].update(batchsize=3), s["stages"][3]["with"].update(epochs=-1)))
    with pytest.raises(UserError) as info:
        load_pipeline(write(tmp_path, spec))
    assert "stages.src.with.batchsize" in str(info.value) and "stages.ad.with.epochs" in str(info.value)


def test_overrides(tmp_path):
    spec = load_pipeline(write(tmp_path, base_spec()), ["stages.ad.with.epochs=5", "artifacts=s3://b/p"])
    assert spec.stage("ad").with_["epochs"] == 5 and spec.artifacts == "s3://b/p"
    with pytest.raises(UserError, match="no stage named 'zz'"):
        load_pipeline(write(tmp_path, base_spec()), ["stages.zz.with.epochs=5"])
    for bad in ("=1", "stages.ad..epochs=1", ".artifacts=x"):
        with pytest.raises(UserError, match=rf"^--set '{re.escape(bad)}': expected KEY=VALUE with a dotted KEY"):
            load_pipeline(write(tmp_path, base_spec()), [bad])


def test_a_bad_value_from_set_is_blamed_on_set_and_adapter_policies_elsewhere_are_refused(tmp_path):
    path = write(tmp_path, base_spec())
    with pytest.raises(UserError) as info:
        load_pipeline(path, ["stages.ad.with.epochs=abc", "stages.src.with.batch_size=7"])
    assert str(info.value).startswith(f"{path}: --set stages.ad.with.epochs: ")
    with pytest.raises(UserError) as info:
        load_pipeline(path, ["stages.src.policy.min_input_coverage=0.5"])
    assert str(info.value) == f"{path}: --set stages.src.policy.min_input_coverage: applies to adapter stages only " \
        "(the coverage of its caches)"


def test_override_values_that_are_not_yaml_and_run_ids_that_are_no_names_are_refused(tmp_path, capsys):
    from clipforge.config.pipeline import check_run_id

    with pytest.raises(UserError, match=r"--set 'stages.ad.with.epochs=\[1': the value is not valid YAML"):
        load_pipeline(write(tmp_path, base_spec()), ["stages.ad.with.epochs=[1"])
    for bad in ("../../x", "a/b", "My Run", "-x", "x" * 41):
        with pytest.raises(UserError, match="--run-id"):
            check_run_id(bad)
    assert check_run_id("nightly-2026-11-26") == "nightly-2026-11-26"
    # `--run-id "$RUN_ID"` with the variable unset: refused, not a new run that resumes nothing.
    spec = write(tmp_path, {**base_spec(), "artifacts": str(tmp_path / "artifacts")})
    assert main(["run", spec, "--run-id", ""]) == 2
    assert "error: --run-id '': use lowercase letters" in capsys.readouterr().err
    assert not (tmp_path / "artifacts").exists()
    with pytest.raises(UserError, match=r"run_id: 'My_Run': use lowercase letters, digits and '-'"):
        load_pipeline(write(tmp_path, {**base_spec(), "run_id": "My_Run"}))
    assert load_pipeline(write(tmp_path, {**base_spec(), "run_id": "my-run"})).run_id == "my-run"


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `clipforge schema | head -1`: the pipe closes while the schema (~40 KB) is being written.
    import fcntl
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the output, so the writer must block
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "schema"], stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    assert os.read(read_end, 100).startswith(b"{")
    os.close(read_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and b"Traceback" not in err, err.decode()[-2000:]


def test_a_yaml_mistake_names_its_line_and_a_misspelt_kind_is_said_once(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("artifacts: x\nstages:\n  - name: a\n    kind: index\n   with: {}\n")
    with pytest.raises(UserError, match=r"is not valid YAML \(line 5, column 4\)"):
        load_pipeline(str(path))
    with pytest.raises(UserError) as info:
        load_pipeline(write(tmp_path, mutate(lambda s: s["stages"][1].update(kind="cahce"))))
    assert "unknown kind 'cahce'" in str(info.value) and "is a cahce" not in str(info.value)
    with pytest.raises(UserError, match=rf"^{tmp_path / 'spec.yaml'}: stages: needs form a cycle"):
        load_pipeline(write(tmp_path, mutate(lambda s: s["stages"][0].update(needs=["ad"]))))


def test_a_stage_key_lists_folders_but_never_a_file_as_one(tmp_path, monkeypatch):
    """A cache's source may be a folder (its listing counts) or an HDF5 file: a file is fingerprinted as a
    file, with no listing asked for (a bucket may grant reads but not LIST)."""
    from clipforge.config.pipeline import PipelineSpec
    from clipforge.orchestrate.resolve import resolve_stage
    from clipforge.storage import uri as storage

    (tmp_path / "stimuli.hdf5").write_bytes(b"not read here")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"png")
    listed = []
    real = storage.tree_fingerprint
    monkeypatch.setattr(storage, "tree_fingerprint",
                        lambda uri, keep=None, **kw: listed.append(uri) or real(uri, keep, **kw))
    def key(**settings) -> str:
        spec = PipelineSpec.model_validate({"artifacts": str(tmp_path / "a"), "stages": [
            {"name": "c", "kind": "cache", "with": {**settings, "model": "m", "pretrained": "w.pt"}}]})
        return resolve_stage(spec, spec.stages[0], {}).key

    key(source=str(tmp_path / "stimuli.hdf5"), index="i.parquet")
    before = key(source=str(tmp_path / "photos"))
    assert listed == [str(tmp_path / "photos")]
    (tmp_path / "photos" / "b.png").write_bytes(b"png")
    assert key(source=str(tmp_path / "photos")) != before


def test_check_says_a_specs_mistakes_without_running_it(tmp_path, capsys):
    """What a spec given to the chart by --set-file gets before `helm install`: the chart takes it as a string."""
    from clipforge.cli import main

    good = write(tmp_path, base_spec())
    assert main(["check", good]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: 4 stages, in order: idx, src, tgt, ad\ninputs not looked for")
    assert not (tmp_path / "artifacts").exists()  # nothing ran
    bad = mutate(lambda s: s["stages"][1].update(resources={"gpus": "two"}, need=["idx"]))
    (tmp_path / "bad").mkdir()
    path = write(tmp_path / "bad", bad)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages.src.resources.gpus" in err and "stages.src.need: unknown key" in err
    assert main(["check", good, "--set", "stages.ad.with.epochs=-1"]) == 2  # a stage's own settings too
    assert "stages.ad.with.epochs" in capsys.readouterr().err


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    """Plain YAML keeps the last of two equal keys silently: a pasted line would run with the other value."""
    path = tmp_path / "spec.yaml"
    path.write_text("artifacts: x\nstages:\n  - name: a\n    kind: index\n    with:\n      subject: subj01\n"
                    "      subject: subj02\n")
    with pytest.raises(UserError, match=r"is not valid YAML \(line 7, column 7\): key 'subject' is given twice "
                                        r"\(first on line 6\)"):
        load_pipeline(str(path))
    # A merge's keys are overridden by the mapping's own, as YAML defines.
    path.write_text("artifacts: x\nstages:\n  - &a {name: a, kind: index, with: {subject: subj01, expdesign: e.mat}}\n"
                    "  - {<<: *a, name: b}\n")
    assert [s.name for s in load_pipeline(str(path)).stages] == ["a", "b"]
    path.write_text("artifacts: x\nstages:\n  - &a {name: a, kind: index, with: {subject: subj01, expdesign: e.mat}}\n"
                    "  - {<<: *a, name: b, name: c}\n")
    with pytest.raises(UserError, match="key 'name' is given twice"):  # beside a merge too
        load_pipeline(str(path))


@pytest.mark.parametrize("where, value", [("artifacts", "s3://"), ("artifacts", "s4://bucket/x"),
                                          ("stages.src.output", "s3://"), ("stages.ad.policy.reuse_existing", "s3:///x")])
def test_a_uri_of_no_scheme_clipforge_writes_is_refused_when_the_spec_is_read(tmp_path, where, value):
    """`s3://` alone was joined into a local folder named `s3:`, and `s4://` failed on a path never written."""
    with pytest.raises(UserError, match=rf"{re.escape(where)}: .*unsupported URI {re.escape(repr(value))}"):
        load_pipeline(write(tmp_path, base_spec()), [f"{where}={value}"])


def test_stages_that_pin_one_folder_or_the_store_are_refused(tmp_path):
    """Two training stages pinned to one folder: the second replaced the first's model, silently."""
    spec = mutate(lambda s: (s["stages"][1].update(output="pinned"), s["stages"][2].update(output="./pinned/")))
    with pytest.raises(UserError, match=r"stages.tgt.output: ./pinned/ is also stages.src.output: each stage needs a "
                                        "folder of its own"):
        load_pipeline(write(tmp_path, spec))
    spec = mutate(lambda s: (s["stages"][1].update(output="pinned"), s["stages"][2].update(output="pinned/tgt")))
    with pytest.raises(UserError, match=r"stages.tgt.output: pinned/tgt and stages.src.output \(pinned\) are one "
                                        "inside the other"):
        load_pipeline(write(tmp_path, spec))
    with pytest.raises(UserError, match=r"stages.ad.output: . holds the artifact store \(artifacts\)"):
        load_pipeline(write(tmp_path, mutate(lambda s: s["stages"][3].update(output="."))))
    with pytest.raises(UserError, match=r"stages.ad.output: artifacts/cache/ holds the artifact store \(artifacts\) "
                                        "or one of its folders"):  # where keyed caches go
        load_pipeline(write(tmp_path, mutate(lambda s: s["stages"][3].update(output="artifacts/cache/"))))
    spec = mutate(lambda s: (s["stages"][1].update(output=f"file://{tmp_path}/p"), s["stages"][2].update(
        output=f"{tmp_path}/p")))
    with pytest.raises(UserError, match="is also stages.src.output"):  # file:// and a path to one folder
        load_pipeline(write(tmp_path, spec))
    spec = mutate(lambda s: (s["stages"][1].update(output="s3://b/src"), s["stages"][2].update(output="s3://b/srcs")))
    assert load_pipeline(write(tmp_path, spec)).stages[2].output == "s3://b/srcs"


def test_check_looks_for_inputs_as_run_does_or_as_the_driver_does(tmp_path, capsys, monkeypatch):
    """`check` passed a spec whose missing input `run` refused before its first stage."""
    from clipforge.cli import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, base_spec())  # e.mat and s.hdf5 are not there
    assert main(["check", path, "--inputs", "cluster"]) == 0  # local paths are the pods'
    assert "inputs not looked for" not in capsys.readouterr().out
    assert main(["check", path, "--inputs", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages.idx.with.expdesign: e.mat not found" in err and str(tmp_path) in err
    (tmp_path / "e.mat").write_bytes(b"x")
    (tmp_path / "s.hdf5").write_bytes(b"x")
    assert main(["check", path, "--inputs", "local"]) == 0


def test_a_revision_gives_a_stage_a_new_key_and_none_keeps_the_keys_outputs_already_have(tmp_path):
    """An output's key counts settings and inputs, not code: after a fix, `with: {revision: …}` makes the stage
    (and, through its config fingerprint, those reading it) run again. Without one, keys are those of outputs
    made before revisions existed (pinned: a changed key would make every user's store miss)."""
    from clipforge.config.adapter import AdapterConfig
    from clipforge.config.pipeline import PipelineSpec
    from clipforge.orchestrate.resolve import resolve_stage

    def key(**extra) -> str:
        spec = PipelineSpec.model_validate({"artifacts": str(tmp_path), "stages": [
            {"name": "a", "kind": "adapter",
             "with": {"clip_cache": "/nonexistent/a", "target_cache": "/nonexistent/t", **extra}}]})
        return resolve_stage(spec, spec.stages[0], {}).key

    assert key() == "ef05d8e612e992fb"
    assert key(revision="fix-1") != key() and key(revision=2) == key(revision="2") != key(revision="fix-1")
    plain = AdapterConfig(clip_cache="a", target_cache="b", out="c")
    assert plain.fingerprint() == "1adac67f1249c1be"
    assert plain.model_copy(update={"revision": "fix-1"}).fingerprint() != plain.fingerprint()
    # Unset, in no dump: `_augment.json`'s record of its settings (and any other) stays as earlier versions wrote
    # it, or every augmentation, hours with a language model, was made again after the upgrade.
    from clipforge.config.captions import AugmentConfig

    assert "revision" not in AugmentConfig(dataset="d").model_dump() and "revision" not in plain.model_dump()
    assert AugmentConfig(dataset="d", revision=datetime.date(2026, 11, 28)).revision == "2026-11-28"


def test_check_says_which_s3_inputs_it_could_not_look_up(tmp_path, capsys, monkeypatch):
    """With no S3 endpoint answering, `check --inputs cluster` passed in silence, which reads as "all there"."""
    from clipforge.cli import main
    from clipforge.storage import s3

    spec = base_spec()
    spec["stages"][1]["with"]["source"] = "s3://bucket/nsd.hdf5"
    path = write(tmp_path, spec)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setattr(s3, "_clients", {})
    assert main(["check", path, "--inputs", "cluster"]) == 0
    out = capsys.readouterr().out
    assert "1 s3:// input not looked up here, S3 gave no answer: stages.src.with.source: s3://bucket/nsd.hdf5 (" \
        in out, out


def finetune_dataset(root) -> Path:
    """A captioned folder with fixed sizes and mtimes: a stage key over it is the same on every machine."""
    import os

    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png", "c.png"]):
        (folder / name).write_bytes(b"x" * (10 + i))  # only names, sizes and mtimes count in a key
    (folder / "index.csv").write_text("filepath,caption\na.png,a red square\nsub/b.png,a dark square\nc.png,a square\n")
    (folder / "README.txt").write_text("my notes\n")
    for path in folder.rglob("*"):
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return folder


def finetune_keys(root, dataset: str) -> tuple[str, list[str]]:
    from clipforge.config.pipeline import PipelineSpec
    from clipforge.orchestrate.resolve import resolve_stage

    spec = PipelineSpec.model_validate({"artifacts": str(root / "arts"), "stages": [
        {"name": "ft", "kind": "finetune", "with": {"dataset": dataset, "pretrained": "", "device": "cpu"}}]})
    resolved = resolve_stage(spec, spec.stages[0], {})
    return resolved.key, resolved.earlier_keys


@pytest.mark.parametrize("named", ["index.csv", "folder"])
def test_a_finetune_dataset_counts_its_images_and_captions_not_a_touch_or_its_other_files(tmp_path, named):
    """Its key counted every file of the folder by mtime: a touched index.csv, `captions prepare` run there or a
    README.txt added retrained from scratch. The keys earlier versions gave (pinned) are still found."""
    import os

    folder = finetune_dataset(tmp_path)
    value = str(folder / "index.csv") if named == "index.csv" else str(folder)
    key, earlier = finetune_keys(tmp_path, value)
    then = {"index.csv": ["09c2c8d2c69b69d0", "cb67b94344a16ec4"], "folder": ["3126db1f5de1a013"]}[named]
    assert earlier == then
    os.utime(folder / "index.csv")  # touched: the same captions
    (folder / "README.txt").write_text("other notes\n")
    (folder / "train_original.csv").write_text("filepath,caption\na.png,a red square\n")
    assert finetune_keys(tmp_path, value)[0] == key
    (folder / "index.csv").write_text("filepath,caption\na.png,a crimson square\nsub/b.png,a dark square\n"
                                      "c.png,a square\n")
    edited = finetune_keys(tmp_path, value)[0]
    assert edited != key
    (folder / "c.png").write_bytes(b"y" * 99)  # a photo replaced under its name
    replaced = finetune_keys(tmp_path, value)[0]
    assert replaced not in (key, edited)
    (folder / "d.bmp").write_bytes(b"z" * 7)  # a format the caption page leaves out, which prepare takes
    assert finetune_keys(tmp_path, value)[0] != replaced


def test_a_finetune_output_made_under_an_earlier_key_is_reused_not_trained_again(tmp_path):
    """After the upgrade that stopped counting a dataset's other files, a run over the same folder found no output
    under its new key and would have fine-tuned again."""
    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.pipeline import run_pipeline
    from clipforge.storage.manifest import write_manifest

    folder = finetune_dataset(tmp_path)
    path = write(tmp_path, {"artifacts": str(tmp_path / "arts"), "stages": [
        {"name": "ft", "kind": "finetune", "with": {"dataset": str(folder), "pretrained": "", "device": "cpu"}}]})
    made = tmp_path / "arts" / "finetune" / "3126db1f5de1a013"  # the key clipforge gave this folder before
    write_manifest(str(made), kind="finetune", config={}, config_fingerprint="x", inputs={})
    ran = []
    record = run_pipeline(load_pipeline(path), "after-upgrade", lambda resolved: ran.append(resolved) or 0)
    assert ran == [] and record.data["stages"]["ft"]["status"] == "reused"
    assert record.data["stages"]["ft"]["output"] == str(made)



def test_a_cache_made_before_a_setting_existed_is_reused_not_encoded_again(tmp_path, monkeypatch):
    """`skip_bad` came after caches were made: a setting at its default counted in the pipeline's key (not in the
    stage's own fingerprint), and every such cache, hours of encoding, was made again under a new key. The key
    clipforge gave these inputs before it (99c67db, pinned) is still found."""
    import os

    import pandas as pd

    from clipforge.config.pipeline import load_pipeline
    from clipforge.orchestrate.pipeline import run_pipeline
    from clipforge.storage.manifest import write_manifest

    monkeypatch.chdir(tmp_path)  # relative paths, fixed sizes and mtimes: the key is the same on every machine
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "nsd.hdf5").write_bytes(b"h" * 100)
    (tmp_path / "d" / "model.json").write_text('{"embed_dim": 512}')
    (tmp_path / "d" / "model.pt").write_bytes(b"w" * 50)
    pd.DataFrame({"id": [1, 2, 3], "split": ["train", "train", "test"]}).to_parquet(tmp_path / "d" / "index.parquet")
    for path in (tmp_path / "d").iterdir():
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    path = write(tmp_path, {"artifacts": "arts", "stages": [
        {"name": "c", "kind": "cache", "with": {"source": "d/nsd.hdf5", "index": "d/index.parquet", "model": "m",
                                                "model_config": "d/model.json", "pretrained": "d/model.pt",
                                                "device": "cpu"}}]})
    made = tmp_path / "arts" / "cache" / "ad7eb54a113e63f6"  # the key clipforge gave these inputs before skip_bad
    write_manifest(str(made), kind="cache", config={}, config_fingerprint="x", inputs={})
    ran = []
    record = run_pipeline(load_pipeline(path), "after-upgrade", lambda resolved: ran.append(resolved) or 0)
    assert ran == [] and record.data["stages"]["c"]["status"] == "reused"
    assert record.data["stages"]["c"]["output"] == "arts/cache/ad7eb54a113e63f6"

def test_a_stage_needing_one_stage_twice_is_a_spec_error(tmp_path):
    spec = base_spec()
    spec["stages"][1]["needs"] = ["idx", "idx"]
    with pytest.raises(UserError, match=r"stages\.src\.needs: names idx more than once"):
        load_pipeline(write(tmp_path, spec))


def test_true_for_a_number_is_refused_in_the_specs_own_settings_too(tmp_path):
    """`fallback_limit: true` trained the adapter on one row; `gpus: true` asked for one GPU."""
    spec = base_spec()
    spec["stages"][1]["resources"] = {"gpus": True}
    with pytest.raises(UserError, match=r"stages\.src\.resources\.gpus: expected a number, got true"):
        load_pipeline(write(tmp_path, spec))
