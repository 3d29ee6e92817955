"""Settings of the NSD index stage (`clipforge index nsd`, `kind: index`)."""

from __future__ import annotations

from pydantic import Field

from clipforge.config.base import StageConfig


class IndexConfig(StageConfig):
    """One NSD subject's images (0-based ids of imgBrick); the shared 1000 are the test split."""

    expdesign: str = Field(description="nsd_expdesign.mat (local or s3://), with subjectim and sharedix")
    subject: str = Field(description="subj01 … subj08")
    no_sign_request: bool = Field(False, description="read expdesign anonymously (the public NSD bucket)")
    output: str = Field(description="a .parquet or .csv file, or a prefix that receives index.parquet and "
                        "_manifest.json")
