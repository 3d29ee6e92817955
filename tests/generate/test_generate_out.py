"""What generate may remove from its --out (only images it wrote itself), and what it says it chose from."""

import logging

import pandas as pd
import pytest

from clipforge.cli import main
from clipforge.config.generate import GenerateConfig
from clipforge.data.embeddings import read_embeddings
from clipforge.errors import UserError
from clipforge.stages import generate as generate_stage
from clipforge.storage.manifest import read_manifest

from .conftest import write_cache


def generate(inputs, unclip, out, **overrides):
    values = {"embeddings": inputs["source"], "pipeline": unclip, "out": str(out), "steps": 2, "batch_size": 3,
              "device": "cpu", **overrides}
    return generate_stage.run_generate(GenerateConfig(**values))


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_an_out_holding_files_generate_did_not_write_is_refused_and_left_as_it_is(generation_inputs, unclip,
                                                                                 tmp_path, capsys, monkeypatch):
    """A user's file under images/, beside them, or under batches/ is refused by name before the pipeline
    loads, and stays; so does one put beside a finished result before a rerun that would remove images."""
    argv = ["generate", "--embeddings", generation_inputs["source"], "--pipeline", unclip, "--steps", "2",
            "--device", "cpu", "--limit", "2"]
    finished = tmp_path / "finished"
    generate(generation_inputs, unclip, finished, limit=4)

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline loaded before the refusal")

    monkeypatch.setattr(generate_stage, "load_unclip", no_load)
    cases = [(tmp_path / "a", ["images/README.txt"]), (tmp_path / "b", ["notes.txt", "images/cover.png"]),
             (tmp_path / "c", ["batches/mine.parquet"]), (finished, ["images/README.txt"])]
    for out, names in cases:
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("do not delete")
        code, err = run_cli([*argv, "--out", str(out)], capsys)
        first, more = sorted(names)[0], f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err == (f"clipforge generate: error: out {out} holds {first}{more}, which generate did not write: a "
                       "rerun removes the images it no longer lists; give the images a folder of their own"), err
        assert all((out / name).read_text() == "do not delete" for name in names)
    assert len(list((finished / "images").glob("*.png"))) == 4 and read_manifest(str(finished))["rows"] == 4


def test_a_smaller_limit_logs_the_images_it_removes_and_keeps_hidden_files(generation_inputs, unclip, tmp_path,
                                                                           caplog):
    """The images of ids a rerun no longer selects are generate's own (listed by a batch, or named for an id
    of the cache: an image whose batch a kill kept from committing); they go, counted in the log. Hidden
    files are no image of generate's and stay."""
    out = tmp_path / "g"
    generate(generation_inputs, unclip, out, limit=5, batch_size=2)
    listed = sorted(pd.read_parquet(out / "generated.parquet")["id"])
    orphan = next(i for i in read_embeddings(generation_inputs["source"]).ids if i not in listed)
    (out / "images" / f"{orphan}.png").write_bytes((out / "images" / f"{listed[0]}.png").read_bytes())
    (out / "images" / ".DS_Store").write_bytes(b"finder")
    with caplog.at_level(logging.INFO, logger="clipforge.generate"):
        smaller = generate(generation_inputs, unclip, out, limit=2, batch_size=2)
    assert smaller["rows"] == 2 and smaller["metrics"]["generated_now"] == 0
    assert "removed 4 images of an earlier run that this selection does not include" in caplog.text
    kept = sorted(f"{i}.png" for i in pd.read_parquet(out / "generated.parquet")["id"])
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([".DS_Store", *kept])


def test_a_cache_without_a_split_column_is_said_to_be_chosen_from_all_rows(generation_inputs, unclip, tmp_path,
                                                                          caplog):
    table = read_embeddings(generation_inputs["source"])
    cache = write_cache(tmp_path / "no-split", table.ids, [None] * len(table.ids), table.embeddings, table.model)
    with caplog.at_level(logging.INFO, logger="clipforge.generate"):
        manifest = generate(generation_inputs, unclip, tmp_path / "g", embeddings=cache, limit=2)
    assert manifest["rows"] == 2
    assert f"{cache} has no split column: choosing 2 of all {len(table.ids)} rows" in caplog.text
    assert f"2 ids of all {len(table.ids)} rows (zero-pad conditioning" in caplog.text
    assert "split test" not in caplog.text


def test_images_deleted_or_cut_short_are_generated_again_and_only_they(generation_inputs, unclip, tmp_path, caplog):
    """`generate` run alone trusted its manifest: with images deleted it said "up to date" and evaluate then
    failed on them. Now those ids, and only they, are generated again (each from its own seed: the same
    image), and no id is listed twice."""
    out = tmp_path / "g"
    generate(generation_inputs, unclip, out, limit=4, batch_size=2)
    ids = sorted(pd.read_parquet(out / "generated.parquet")["id"])
    before = {i: (out / "images" / f"{i}.png").read_bytes() for i in ids}
    (out / "images" / f"{ids[0]}.png").unlink()
    (out / "images" / f"{ids[3]}.png").write_bytes(before[ids[3]][:100])
    with caplog.at_level(logging.INFO):
        again = generate(generation_inputs, unclip, out, limit=4, batch_size=2)
    assert "2 of the files its manifest lists are gone or cut short" in caplog.text
    assert again["metrics"]["generated_now"] == 2 and again["rows"] == 4
    assert {i: (out / "images" / f"{i}.png").read_bytes() for i in ids} == before
    batches = pd.concat([pd.read_parquet(p) for p in (out / "batches").glob("*.parquet")])
    assert sorted(batches["id"]) == ids and sorted(pd.read_parquet(out / "generated.parquet")["id"]) == ids
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert generate(generation_inputs, unclip, out, limit=4, batch_size=2)["metrics"]["generated_now"] == 2
    assert "up to date" in caplog.text


def test_a_new_revision_does_not_take_the_images_an_earlier_one_made(generation_inputs, unclip, tmp_path):
    """A revision (after a fix in the code) made a manifest saying so over the images the old code had made."""
    out = tmp_path / "g"
    generate(generation_inputs, unclip, out, limit=2)
    with pytest.raises(UserError, match=r"holds images made with other settings.*precision or revision\)"):
        generate(generation_inputs, unclip, out, limit=2, revision="fix-1")


def test_a_second_generate_into_one_out_waits_for_the_first_then_finds_it_done(generation_inputs, unclip, tmp_path,
                                                                               monkeypatch, caplog):
    """Two `clipforge generate` by hand into one --out do not write its images and batches together: the second
    waits on the lease, then finds the images done and generates none."""
    import functools
    import threading
    import time

    from clipforge.orchestrate import lease

    out = tmp_path / "out"
    monkeypatch.setattr(lease, "StageLease", functools.partial(lease.StageLease, poll=0.05))
    monkeypatch.delenv(lease.RUN_ID_ENV, raising=False)
    results = {}

    def second() -> None:
        results["second"] = generate(generation_inputs, unclip, out, limit=3)

    first = lease.StageLease(str(out), "generate-elsewhere", "generate")  # a live holder
    caplog.set_level(logging.INFO)
    with first:
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.monotonic() + 30
        while "is writing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "run generate-elsewhere (on " in caplog.text
        monkeypatch.setenv(lease.RUN_ID_ENV, "elsewhere")  # the holder's own stage: its runner holds the lease
        results["first"] = generate(generation_inputs, unclip, out, limit=3)
        monkeypatch.delenv(lease.RUN_ID_ENV)
        assert waiter.is_alive() and "second" not in results
    waiter.join(timeout=60)
    assert results["first"]["metrics"]["generated_now"] == 3
    assert results["second"] == read_manifest(str(out))
    assert f"{out} is up to date; nothing to do" in caplog.text
    assert not (out / lease.LEASE_NAME).exists()
