"""Settings of the fine-tuning stage (`clipforge finetune`, `kind: finetune`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from clipforge.config.base import StageConfig


class FinetuneConfig(StageConfig):
    """Fine-tune an open_clip model on captioned images (filepath,caption CSVs) with a contrastive loss."""

    train_data: str | None = Field(
        None, description="training CSV, columns filepath,caption; image paths relative to the CSV's folder, "
                          "absolute, or s3://"
    )
    val_data: str | None = Field(None, description="validation CSV in the same format, scored before training "
                                                   "and after every epoch")
    dataset: str | None = Field(
        None, description="instead of train_data/val_data: a captioned folder's index.csv (or the folder); it is "
                          "split and augmented inside this stage, under OUT/data"
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="with dataset: share of images held out for "
                                "validation (all rows of an image on one side)")
    augment: Literal["none", "manual", "llm"] = Field(
        "manual", description="with dataset: caption variants from a synonym map (manual), a local language model "
                              "(llm), or none"
    )
    per_sample: int = Field(3, ge=0, description="with dataset: caption variants per training row (at most)")
    synonyms: str | None = Field(None, description="with augment manual: JSON word -> synonyms; default: the "
                                                   "shipped map")
    llm_model: str | None = Field(None, description="with augment llm: local folder of a transformers causal LM")
    skip_bad: bool = Field(False, description="with dataset: drop (and count) missing or undecodable images")

    model: str = Field("ViT-B-32", description="open_clip model name")
    pretrained: str | None = Field(
        "openai", description="starting weights: an open_clip tag (openai, laion2b_…), a local file or s3://; "
                              "empty for random weights"
    )
    model_config_file: str | None = Field(
        None, alias="model_config", description="JSON open_clip model config, registered under the file's stem"
    )

    out: str = Field("models_finetuned", description="output folder (local or s3://): each run in "
                                                     "OUT/<YYYYmmdd-HHMMSS>/ unless --no-timestamped")
    timestamped: bool = Field(True, description="write each run into a new OUT/<YYYYmmdd-HHMMSS>/ folder; off: "
                                                "OUT is the run folder (pipelines)")
    resume: str | None = Field(None, description="continue a timestamped run: latest (the newest under OUT) "
                                                 "or a run folder")

    epochs: int = Field(10, ge=1, description="passes over the training rows")
    batch_size: int = Field(32, ge=2, description="image-caption pairs per forward pass over all processes; "
                                                  "each is a negative for the others")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step; the contrastive batch is "
                                                 "batch_size x grad_accum (open_clip's --accum-freq)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.2, ge=0, description="AdamW weight decay; never on norms, biases, logit_scale")
    warmup: int = Field(500, ge=0, description="linear warmup steps before the cosine decay; a warmup as long as "
                                               "the run is clamped to a tenth of it, with a warning")
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm to this; 0 turns clipping off")
    seed: int = Field(0, ge=0, description="seeds initial weights, data order, augmentation and the split")
    lock_image: bool = Field(False, description="freeze the image tower and train the text tower (LiT)")
    lock_image_unlocked_groups: int = Field(0, ge=0, description="with lock_image: last image layer groups left "
                                                                 "trainable")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                        "memory, more compute (big models)")
    compile: bool = Field(False, description="torch.compile the model (fused kernels, faster steps on a GPU); "
                                             "pays the compilation, a minute or more, before the first step")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where training runs; auto prefers CUDA")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="GPU autocast precision; auto is bf16 where supported; CPU always trains in fp32"
    )
    num_processes: int = Field(1, ge=1, description="training processes on this machine (one per GPU); "
                                                    "machines join through MASTER_ADDR/NNODES/NODE_RANK")
    workers: int = Field(4, ge=0, description="DataLoader processes per training process that load and "
                                              "transform images")
    logdir: str | None = Field(None, description="local folder for TensorBoard events, one sub-folder per run; "
                                                 "default: OUT/<run>/logs")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 means once per epoch")
    keep_checkpoints: int = Field(2, ge=1, description="newest complete checkpoints kept under the run's "
                                                       "checkpoints/")
    log_every: float = Field(10.0, gt=0, description="seconds between progress lines, and between reads of the "
                                                     "training losses off the GPU (each read waits for it)")
    work_dir: str | None = Field(None, description="local staging folder for checkpoints when OUT is on S3")

    model_config = ConfigDict(populate_by_name=True)

    # Where things live, how many processes and loader workers share the work, activation recomputation,
    # compilation and how often we save or log cannot change the weights: the batches and each row's
    # augmentation are functions of (seed, epoch, row), and resume is exact. (Compiled kernels, like another
    # process count, may round differently: the same computation, not the same bits; and a batch lowered to fit
    # a set smaller than it is a multiple of the count.) The data's content counts through the inputs.
    volatile = frozenset({
        "train_data", "val_data", "dataset", "out", "timestamped", "resume", "device", "num_processes", "workers",
        "logdir", "checkpoint_every", "keep_checkpoints", "log_every", "work_dir", "grad_checkpointing", "compile",
    })

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.dataset and (self.train_data or self.val_data):
            problems.append("give `dataset`, or `train_data` with `val_data`, not both")
        elif not self.dataset and not (self.train_data and self.val_data):
            problems.append("give `train_data` and `val_data` (CSV files), or `dataset` (a captioned folder's "
                            "index.csv)")
        if self.skip_bad and not self.dataset:
            problems.append("`skip_bad` applies to `dataset`, which this run prepares; CSVs given as `train_data` are "
                            "used as they are (`clipforge captions prepare --skip-bad` drops bad images from a split)")
        given = [name for name in ("val_fraction", "augment", "per_sample", "synonyms", "llm_model")
                 if getattr(self, name) != type(self).model_fields[name].default]
        if given and not self.dataset:
            named = ", ".join(f"`{name}`" for name in given)
            problems.append(f"{named} {'applies' if len(given) == 1 else 'apply'} to `dataset`, which this run "
                            "splits and augments; `train_data` and `val_data` are used as they are (clipforge captions "
                            "augment adds caption variants to a split's train.csv)")
        if self.synonyms and self.augment != "manual":
            problems.append(f"`synonyms` applies to `augment` manual, not {self.augment}: leave out one of them")
        if self.lock_image_unlocked_groups and not self.lock_image:
            problems.append("`lock_image_unlocked_groups` applies with `lock_image` (it leaves the last groups of "
                            "the locked image tower trainable): add `lock_image`, or leave it out")
        if self.augment == "llm" and not self.llm_model:
            problems.append("`augment` llm needs `llm_model`: a local folder of a transformers language model "
                            "(no hub downloads)")
        if self.resume and not self.timestamped:
            problems.append("`resume` applies to `timestamped` runs; without them OUT itself is resumed")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def mixed_precision(self) -> str:
        """The precision in Accelerate's words."""
        return {"fp32": "no"}.get(self.precision, self.precision)
