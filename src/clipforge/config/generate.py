"""Settings of the generate stage (`clipforge generate`, `kind: generate`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from clipforge.config.base import StageConfig, check_out_apart

# A pipeline value that is no local folder and looks like this is a hub id (`owner/name`), not a missing path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")


class GenerateConfig(StageConfig):
    """Images from cached embeddings with Stable unCLIP, conditioned through an adapter or by zero-padding."""

    embeddings: str = Field(description="embedding cache (id, split, embedding), e.g. the source-space cache")
    adapter: str | None = Field(None, description="adapter output mapping the embeddings into the pipeline's space")
    zero_pad: int | None = Field(None, ge=1, description="zero-pad the embeddings to this dimension instead "
                                                         "(default without an adapter: the pipeline's dimension)")
    pipeline: str = Field(description="Stable unCLIP image-variation pipeline: hub id, or a save_pretrained folder "
                                      "(local or s3://)")
    out: str = Field(description="output prefix: images/<id>.png, generated.parquet, _manifest.json")
    split: str | None = Field("test", description="generate for this split only (all rows when the cache has none)")
    limit: int | None = Field(None, ge=1, description="at most this many ids (a seeded choice)")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale")
    noise_level: int = Field(0, ge=0, le=999, description="noise added to the image embeddings: the unCLIP noise "
                             "level, a step of its noising scheduler (0 to 999)")
    embed_norm: float | None = Field(None, gt=0, description="rescale each embedding to this L2 norm first "
                                                            "(cached embeddings are unit length)")
    seed: int = Field(0, ge=0, description="base seed; each id's generator seed derives from it and the id")
    batch_size: int = Field(8, ge=1, description="images per pipeline call (the unit of commit)")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the pipeline runs")
    offload: bool = Field(False, description="enable_model_cpu_offload for small GPUs")
    attention_slicing: bool = Field(False, description="enable_attention_slicing (saves memory, costs speed)")
    cache_dir: str | None = Field(None, description="where an s3:// pipeline folder is downloaded to")

    volatile = frozenset({"embeddings", "adapter", "out", "batch_size", "device", "offload", "attention_slicing",
                          "cache_dir"})

    @model_validator(mode="after")
    def _one_conditioning(self):
        if self.adapter and self.zero_pad:
            raise ValueError("give `adapter` or `zero_pad`, not both")
        return self

    @model_validator(mode="after")
    def _out_apart_from_the_inputs(self):
        check_out_apart(self.out, "embeddings", self.embeddings, "the images")
        check_out_apart(self.out, "adapter", self.adapter, "the images")
        return self
