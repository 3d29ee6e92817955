"""Settings of the cache stage (`clipforge cache`, `kind: cache`)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from clipforge.config.base import StageConfig


class CacheConfig(StageConfig):
    """Encode images — rows of an HDF5 dataset, or a folder or CSV of image files — into a parquet cache."""

    source: str = Field(description="HDF5 file (.hdf5/.h5), image folder, or CSV with a filepath column; "
                                    "local or s3://")
    dataset: str = Field("imgBrick", description="dataset inside the HDF5 file, shaped (N, H, W, 3) uint8")
    index: str | None = Field(None, description="parquet/CSV file with an `id` column (and optional `split`)")
    subject: str | None = Field(None, description="NSD subject (subj01…subj08); finds INDEX_ROOT/SUBJECT.parquet, "
                                                "SUBJECT.csv or SUBJECT/index.parquet")
    index_root: str | None = Field(None, description="folder of per-subject index files, with --subject")
    model: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32")
    model_config_file: str | None = Field(
        None, alias="model_config", description="JSON open_clip model config, registered under the file's stem"
    )
    pretrained: str | None = Field(None, description="open_clip pretrained tag, or weights as a local path or s3://; "
                                                  "needed with model ('' for random weights)")
    model_id: str | None = Field(None, description="Stable Diffusion id; resolves to the CLIP encoder it conditions on")
    output: str = Field(description="output prefix for the parquet shards and _manifest.json (local or s3://)")
    batch_size: int = Field(500, gt=0, description="rows per shard: the unit of commit and resume")
    inference_batch_size: int | None = Field(
        None, gt=0, description="rows per encoder call; default 256 on a GPU (fills an H100 with ViT-H-14), 32 on a CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where encoders run")
    precision: Literal["auto", "fp32", "bf16", "fp16", "pure_bf16", "pure_fp16"] = Field(
        "auto", description="encoder precision: bf16/fp16 autocast, or pure_* with the weights cast too (faster, "
                            "slightly further from fp32); auto is bf16 on a GPU that has it (Ampere on), else fp32"
    )
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: one process on one device, reads overlapping encoding (fastest start-up); "
                            "ray: Ray Data over every GPU of a cluster; auto is ray with several GPUs or a "
                            "RAY_ADDRESS, else local"
    )
    read_workers: int = Field(4, gt=0, description="shards read at once (local engine)")
    cache_dir: str | None = Field(None, description="persistent on-disk cache of fetched S3 byte ranges and weights")
    no_sign_request: bool = Field(False, description="read the source anonymously (public buckets such as NSD's)")
    num_encoders: int | None = Field(None, gt=0, description="encoder actors; default one per GPU, else one")
    skip_bad: bool = Field(False, description="image folders and CSVs: leave out (and name) images that cannot be "
                           "read or decoded, instead of failing")

    model_config = ConfigDict(populate_by_name=True)
    # Where a cache lives does not change it: a copied or moved cache is the same cache. Caches made while
    # `output` still counted recorded the fingerprint `located_fingerprint` gives, and stay current.
    volatile = frozenset({"inference_batch_size", "device", "cache_dir", "no_sign_request", "num_encoders", "engine",
                          "read_workers", "output"})
    additive = frozenset({"skip_bad"})

    def located_fingerprint(self) -> str:
        """The fingerprint with `output` counted, as caches made before it stopped counting recorded it."""
        return self.fingerprint(counting=frozenset({"output"}))

    @model_validator(mode="after")
    def _one_index_and_one_model(self):
        from clipforge.data.image_folder import is_image_collection

        if is_image_collection(self.source):
            # `dataset` has a default, so only one given counts: it was ignored, and a cache of the wrong images made.
            hdf5_only = [key for key in ("index", "subject", "index_root") if getattr(self, key)]
            hdf5_only += ["dataset"] if "dataset" in self.model_fields_set else []
            if hdf5_only:
                named = ", ".join(f"`{key}`" for key in hdf5_only) + (" applies" if len(hdf5_only) == 1 else " apply")
                # `nsd_stimuli.hdf` for `.hdf5`: the likelier mistake is the name, said first.
                typo = not self.source.startswith("s3://") and not os.path.exists(self.source)
                raise ValueError(f"source {self.source!r} not found, and its name is not an HDF5 file's (.hdf5, .h5), "
                                 f"to which {named}" if typo else
                                 f"{named} to HDF5 sources (.hdf5, .h5); source "
                                 f"{self.source!r} is taken as an image folder or CSV, which lists its own images")
        elif self.skip_bad:
            raise ValueError("`skip_bad` applies to image folders and CSVs, not to HDF5 sources")
        elif self.index and (self.subject or self.index_root):
            raise ValueError("give `index`, or `subject` with `index_root`, not both")
        elif not self.index and not (self.subject or self.index_root):
            raise ValueError("give `index`, or `subject` with `index_root`")
        if self.subject and not self.index_root or self.index_root and not self.subject:
            raise ValueError("`subject` and `index_root` go together")
        if not self.model and not self.model_id:
            raise ValueError("give `model` (with `pretrained`) or `model_id`")
        if self.model and self.model_id:
            raise ValueError("give `model` or `model_id`, not both")
        if self.model and self.pretrained is None:  # a cache of random weights is hours of GPU time for nothing
            raise ValueError("give `pretrained` with `model`: an open_clip tag (openai, laion2b_…) or a weights file, "
                             "local or s3://; '' encodes with random weights (benchmarks, tests)")
        if self.engine == "local" and (self.num_encoders or 1) > 1:
            raise ValueError("`num_encoders` > 1 needs `engine` ray (the local engine drives one device)")
        return self
