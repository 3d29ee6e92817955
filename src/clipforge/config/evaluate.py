"""Settings of the evaluate stage (`clipforge evaluate`, `kind: evaluate`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clipforge.config.adapter import adapter_folder, check_two_caches
from clipforge.config.base import StageConfig


class EvaluateConfig(StageConfig):
    """Adapter vs. zero-padding on the test split: embeddings, and generated images when given."""

    clip_cache: str = Field(description="source-space embedding cache (e.g. ViT-B-32, 512-D)")
    target_cache: str = Field(description="target-space embedding cache (e.g. ViT-H-14, 1024-D)")
    adapter: str | None = Field(None, description="adapter output (or the adapter.safetensors in it); none: "
                                "zero-padding only")
    out: str = Field(description="output prefix: metrics.json, metrics.png, _manifest.json")
    generated: list[str] = Field(default_factory=list, description="generate outputs to score on images: "
                                 "CLIPScore and R@1 with the target cache's encoder, and a contact sheet")
    sheet_rows: int = Field(8, ge=1, description="test ids (a seeded choice) on the contact sheet")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the target encoder scores generated images; auto prefers CUDA")
    split: Literal["test", "train"] = Field("test", description="which split's rows to score: the held-out test "
                                            "rows, or the training rows (how well the adapter fits them)")
    seed: int = Field(0, ge=0, description="seed of the 90/10 split used when the caches have no split column "
                      "(an adapter's own, when one is evaluated)")
    test_share: float = Field(0.1, gt=0, lt=1, description="test share of that seeded split (an adapter's own, "
                              "when one is evaluated)")

    volatile = frozenset({"clip_cache", "target_cache", "adapter", "generated", "out", "device"})

    @field_validator("adapter")
    @classmethod
    def _the_adapters_folder(cls, value: str | None) -> str | None:
        """An adapter's weights file stands for its output folder, where its card and manifest are."""
        return adapter_folder(value) if value else value

    @model_validator(mode="after")
    def _out_apart_from_the_caches(self):
        check_two_caches(self, "the evaluation")
        return self
