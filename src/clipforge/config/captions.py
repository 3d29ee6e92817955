"""Settings of caption preparation (`clipforge captions prepare|augment`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clipforge.config.base import StageConfig


def dataset_folder(value: str) -> str:
    """The folder, also when given as DIR/ or as DIR/index.csv (what `finetune --dataset` takes)."""
    value = value.rstrip("/") or "/"
    if value == "index.csv":
        return "."
    return value[: -len("/index.csv")] if value.endswith("/index.csv") else value


class PrepareConfig(StageConfig):
    """Check a captioned image folder and split its index.csv into train_original.csv and val.csv."""

    dataset: str = Field(description="folder (local or s3://) holding index.csv with columns filepath,caption")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of images held out in val.csv (all rows of "
                                "an image on one side)")
    seed: int = Field(0, ge=0, description="seed of the split")
    skip_bad: bool = Field(False, description="drop (and count) missing or undecodable images instead of failing")
    workers: int = Field(8, ge=1, description="threads that check images")

    _folder = field_validator("dataset")(dataset_folder)


class AugmentConfig(StageConfig):
    """Write train.csv: every training caption plus up to N paraphrases of it."""

    dataset: str = Field(description="folder holding train_original.csv (from `captions prepare`)")
    method: Literal["manual", "llm"] = Field("manual", description="synonym map, or a local language model")
    per_sample: int = Field(3, ge=0, description="variants per caption (at most; never the original again)")
    synonyms: str | None = Field(None, description="JSON word -> list of synonyms; default: the shipped map")
    llm_model: str | None = Field(None, description="local folder of a transformers causal LM (method llm)")
    seed: int = Field(0, ge=0, description="seed of the variants")

    _folder = field_validator("dataset")(dataset_folder)

    @model_validator(mode="after")
    def _llm_needs_a_model(self):
        if self.method == "llm" and not self.llm_model:
            raise ValueError("`method` llm needs `llm_model`: a local folder of a transformers language model "
                             "(no hub downloads)")
        return self
