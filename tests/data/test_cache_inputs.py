"""A cache named where its folder is wanted: what the user gave is said, not that a manifest is missing."""

import pytest

from clipforge.data.embeddings import cache_manifest
from clipforge.errors import UserError


def test_a_file_given_as_a_cache_is_said_to_be_a_file(tmp_path):
    """`--clip-cache stimuli.hdf5` (or one shard) was "incomplete or missing: no _manifest.json"."""
    shard = tmp_path / "shard-00000.parquet"
    shard.write_bytes(b"PAR1")
    with pytest.raises(UserError, match=rf"^clip_cache {shard} is a file: give the folder the cache stage wrote"):
        cache_manifest(str(shard), "clip_cache")
    with pytest.raises(UserError, match="is incomplete or missing: no _manifest.json"):
        cache_manifest(str(tmp_path / "nothing"), "clip_cache")
