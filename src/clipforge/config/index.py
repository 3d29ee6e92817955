"""Settings of the NSD index stage (`clipforge index nsd`, `kind: index`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from clipforge.config.base import StageConfig

SUBJECT = re.compile(r"subj0?([1-8])")  # subj01 … subj08 (subj1 too)


def subject_name(value: str) -> str | None:
    """The one name of an NSD subject (`subj1` is `subj01`, as NSD's files name it); None for no subject."""
    match = SUBJECT.fullmatch(value)
    return f"subj{int(match.group(1)):02d}" if match else None


class IndexConfig(StageConfig):
    """One NSD subject's images (0-based ids of imgBrick); the shared 1000 are the test split."""

    expdesign: str = Field(description="nsd_expdesign.mat (local or s3://), with subjectim and sharedix")
    subject: str = Field(description="subj01 … subj08")
    no_sign_request: bool = Field(False, description="read expdesign anonymously (the public NSD bucket)")
    output: str = Field(description="a .parquet or .csv file, or a prefix that receives index.parquet and "
                        "_manifest.json")

    @field_validator("subject")
    @classmethod
    def _an_nsd_subject(cls, value: str) -> str:
        """Said when the config is read: a pipeline refuses its spec before any stage runs (or makes a folder)."""
        if subject_name(value) is None:
            raise ValueError(f"unknown subject {value!r}: use subj01 … subj08")
        return value  # as written: another spelling would re-key the outputs of specs that wrote subj1
