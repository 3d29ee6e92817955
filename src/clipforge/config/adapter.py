"""Settings of the adapter stage (`clipforge train-adapter`, `kind: adapter`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipforge.config.base import StageConfig, check_out_apart


class AdapterConfig(StageConfig):
    """Train an adapter from one embedding cache's space to another's (e.g. CLIP ViT-B/32 512-D -> ViT-H/14 1024-D)."""

    clip_cache: str = Field(description="source-space embedding cache (a cache stage output, local or s3://)")
    target_cache: str = Field(description="target-space embedding cache, joined with the source on id")
    out: str = Field(description="output prefix: adapter, metrics, logs, checkpoints, _manifest.json")
    epochs: int = Field(30, ge=1, description="passes over the training rows")
    batch_size: int = Field(128, ge=1, description="rows per optimizer step over all processes (global batch)")
    limit: int | None = Field(None, ge=1, description="train on a seeded subset of this many training rows")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms)")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 turns clipping off")
    seed: int = Field(0, ge=0, description="seeds weights, data order, splits, --limit subset and dropout")
    arch: Literal["linear", "mlp"] = Field("mlp", description="linear map, or residual MLP with LayerNorm/GELU")
    hidden_dim: int = Field(1024, ge=1, description="width of the residual MLP")
    depth: int = Field(2, ge=0, description="residual blocks of the MLP")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside the residual blocks")
    in_dim: int | None = Field(None, ge=1, description="expected source dimension; checked against the cache")
    out_dim: int | None = Field(None, ge=1, description="expected target dimension; checked against the cache")
    cosine_weight: float = Field(1.0, ge=0, description="weight of the loss term 1 - cos(adapted, target)")
    mse_weight: float = Field(1.0, ge=0, description="weight of the mean squared error term (x dimension)")
    contrastive_weight: float = Field(0.0, ge=0, description="weight of an InfoNCE term over the global batch")
    temperature: float = Field(0.05, gt=0, description="temperature of the InfoNCE term")
    test_share: float = Field(0.1, gt=0, lt=1, description="test share of a seeded split when caches have no split")
    min_overlap: float = Field(
        0.9, ge=0, le=1, description="least share of the smaller cache's ids that the other cache must also hold"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where training runs; auto prefers CUDA")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="GPU autocast precision; auto is bf16 where supported; CPU always trains in fp32"
    )
    num_processes: int = Field(1, ge=1, description="training processes on this machine (one per GPU); "
                                                    "machines join through MASTER_ADDR/NNODES/NODE_RANK")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 means once per epoch")
    keep_checkpoints: int = Field(2, ge=1, description="newest complete checkpoints kept under OUT/checkpoints")
    log_every: float = Field(10.0, gt=0, description="seconds between progress lines, and between reads of the "
                                                     "training losses off the GPU (each read waits for it)")
    work_dir: str | None = Field(None, description="local staging folder for checkpoints when OUT is on S3")
    compile: bool = Field(False, description="torch.compile the adapter; on one GPU its step is replayed as a CUDA "
                                             "graph, one launch instead of dozens (a small MLP is launch-bound)")

    # Where things live, how many processes share the work and how often we save or log do not change what is
    # trained: the global batch and the data order are the same for any process count, and resume is exact. The
    # bits may differ with the count: each process draws its own dropout masks, and a batch lowered to fit a set
    # smaller than it is a multiple of the count. Another count makes an adapter as good, so it is reused.
    volatile = frozenset({
        "clip_cache", "target_cache", "out", "device", "num_processes", "checkpoint_every", "keep_checkpoints",
        "log_every", "work_dir", "compile",
    })

    @model_validator(mode="after")
    def _some_loss(self):
        if self.cosine_weight == self.mse_weight == self.contrastive_weight == 0:
            raise ValueError("`cosine_weight`, `mse_weight` and `contrastive_weight` are all 0: nothing to train")
        if self.batch_size == 1 and self.only_contrastive:
            raise ValueError("`batch_size` 1 leaves InfoNCE, the only loss term here, no negatives: nothing would "
                             "train; use at least 2")
        return self

    @property
    def only_contrastive(self) -> bool:
        return self.cosine_weight == self.mse_weight == 0

    @model_validator(mode="after")
    def _out_apart_from_the_caches(self):
        check_two_caches(self, "the adapter")
        return self


def adapter_folder(path: str) -> str:
    """An adapter stage's output, also when given by its weights file or its card (`adapter.json`): the other
    files and the manifest are beside them."""
    if not path.endswith(".safetensors") and path.rsplit("/", 1)[-1] != "adapter.json":
        return path
    return path.rsplit("/", 1)[0] if "/" in path else "."


def check_two_caches(config, what: str) -> None:
    """`clip_cache` and `target_cache` are two caches and `out` is in neither: files under a cache's
    prefix would become part of it (`pyarrow.dataset(CACHE)` would fail on them). For the stages that read
    both caches (train-adapter, evaluate)."""
    for role in ("clip_cache", "target_cache"):
        check_out_apart(config.out, role, getattr(config, role), what)
    if config.clip_cache.rstrip("/") == config.target_cache.rstrip("/"):
        raise ValueError("`clip_cache` and `target_cache` are the same cache: an adapter maps one space to another")
