"""`clipforge cache` finds an index wherever `clipforge index --output` put it."""

import boto3
import numpy as np
import pandas as pd
import pytest
import scipy.io

from clipforge.cli import main
from clipforge.data.embeddings import read_embeddings
from clipforge.data.index import index_at, index_for_subject, read_index
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.errors import UserError


@pytest.fixture
def nsd(tmp_path, tiny_models):
    """Six 32-pixel stimuli, an expdesign whose subjects see a few of them, and the cache flags but the index."""
    write_nsd_hdf5(tmp_path / "stimuli.hdf5", 6, size=32)
    subjectim = np.array([[1, 3, 5], [2, 4, 6]] * 4, dtype=np.float64)
    scipy.io.savemat(tmp_path / "expdesign.mat", {"subjectim": subjectim, "sharedix": np.array([[2.0, 5.0]])})
    cfg_path, weights = tiny_models["source"]
    flags = ["--source", str(tmp_path / "stimuli.hdf5"), "--model", "tiny-source", "--model-config", str(cfg_path),
             "--pretrained", str(weights), "--device", "cpu", "--engine", "local"]
    return tmp_path, flags


def write_index(tmp_path, subject, output):
    assert main(["index", "nsd", "--expdesign", str(tmp_path / "expdesign.mat"), "--subject", subject,
                 "--output", str(output)]) == 0


def test_each_form_the_index_command_writes_is_found(nsd):
    tmp_path, flags = nsd
    write_index(tmp_path, "subj02", tmp_path / "idx" / "subj02.csv")
    write_index(tmp_path, "subj01", tmp_path / "prefixes" / "subj01")  # prefix: subj01/index.parquet
    assert main(["cache", *flags, "--subject", "subj02", "--index-root", str(tmp_path / "idx"),
                 "--output", str(tmp_path / "by-csv")]) == 0
    assert main(["cache", *flags, "--subject", "subj01", "--index-root", str(tmp_path / "prefixes"),
                 "--output", str(tmp_path / "by-root")]) == 0
    assert main(["cache", *flags, "--index", str(tmp_path / "prefixes" / "subj01"),
                 "--output", str(tmp_path / "by-prefix")]) == 0
    assert sorted(read_embeddings(str(tmp_path / "by-csv")).ids.tolist()) == [1, 3, 5]
    assert sorted(read_embeddings(str(tmp_path / "by-root")).ids.tolist()) == [0, 2, 4]
    assert sorted(read_embeddings(str(tmp_path / "by-prefix")).ids.tolist()) == [0, 2, 4]


def test_parquet_is_preferred_and_a_missing_index_names_what_was_looked_for(nsd, capsys, caplog):
    tmp_path, flags = nsd
    root = tmp_path / "idx"
    root.mkdir()
    pd.DataFrame({"id": [1]}).to_csv(root / "subj03.csv", index=False)
    assert index_for_subject(str(root), "subj03") == f"{root}/subj03.csv" and not caplog.text
    pd.DataFrame({"id": [2]}).to_parquet(root / "subj03.parquet")
    assert index_for_subject(str(root), "subj03") == f"{root}/subj03.parquet"
    # Two indexes of one subject: one is stale, and which was used is said.
    assert f"holds 2 indexes of subj03 ({root}/subj03.parquet, {root}/subj03.csv): using {root}/subj03.parquet" \
        in caplog.text
    assert main(["cache", *flags, "--subject", "subj04", "--index-root", str(root),
                 "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"clipforge cache: error: no index of subj04 in {root}: looked for "
                                       "subj04.parquet, subj04.csv and subj04/index.parquet (what `clipforge index "
                                       "--output` writes)\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_the_index_without_an_index_file_says_give_the_file(nsd, capsys):
    tmp_path, flags = nsd
    (tmp_path / "indices" / "subj01").mkdir(parents=True)
    assert main(["cache", *flags, "--index", str(tmp_path / "indices" / "subj01"),
                 "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"clipforge cache: error: index {tmp_path}/indices/subj01 is a folder without "
                                       "index.parquet; give the index file (.parquet or .csv) itself\n")
    assert not (tmp_path / "out").exists()
    missing = str(tmp_path / "ids.parquet")
    assert index_at(missing) == missing  # a file's name is taken as given, and read_index says it is not there
    with pytest.raises(UserError, match="ids.parquet not found"):
        read_index(index_at(missing))


def test_an_s3_prefix_holding_the_index_is_found(s3_bucket, tmp_path):
    pd.DataFrame({"id": [3]}).to_parquet(tmp_path / "x.parquet")
    boto3.client("s3").upload_file(str(tmp_path / "x.parquet"), s3_bucket, "indices/subj01/index.parquet")
    boto3.client("s3").upload_file(str(tmp_path / "x.parquet"), s3_bucket, "indices/subj02.parquet")
    assert index_at(f"s3://{s3_bucket}/indices/subj01") == f"s3://{s3_bucket}/indices/subj01/index.parquet"
    assert index_for_subject(f"s3://{s3_bucket}/indices", "subj01") == f"s3://{s3_bucket}/indices/subj01/index.parquet"
    assert index_for_subject(f"s3://{s3_bucket}/indices", "subj02") == f"s3://{s3_bucket}/indices/subj02.parquet"
