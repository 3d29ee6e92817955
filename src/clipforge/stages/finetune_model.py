"""The model side of the fine-tuning stage: open_clip's factory, AdamW's parameter groups, a shorter text pass.

The model, its train/val transforms and its tokenizer all come from open_clip
itself (`create_model_and_transforms`, `get_tokenizer`), so `model.pt` is a
state dict of exactly the module open_clip builds for the same name.

`trim_text_context` makes a CLIP's text tower run on a batch's captions only
as long as the longest of them instead of the model's whole context (77 tokens
for most models): under the causal attention mask a position never sees the
positions after it, and the caption's feature is read at its end-of-text
token, so the padding after it cannot change the result. Captions of a few
words then cost a tenth of the text tower's work, in training and validation.
It is installed only on models where that argument holds, after checking on
real captions that both ways agree.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.config.finetune import FinetuneConfig
from clipforge.errors import UserError
from clipforge.models.encoders import EncoderSpec, check_model_known, names_weights_file
from clipforge.models.weights_loading import loading_weights
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.finetune")


@dataclass
class BuiltModel:
    """open_clip's model, its train and val transforms and its tokenizer, from open_clip's own factory."""

    model: torch.nn.Module
    train_transform: object
    val_transform: object
    tokenizer: object


def build_model(config: FinetuneConfig, cache_dir: str | None = None) -> BuiltModel:
    """The model to fine-tune on the CPU in fp32 (Accelerate moves it and autocasts), or a UserError."""
    check_model_known(config.model, config.model_config_file)  # imports open_clip with what the model needs
    import open_clip

    pretrained = config.pretrained or None
    if names_weights_file(pretrained):
        pretrained = str(storage.fetch_to_local(pretrained, cache_dir))
    with loading_weights(EncoderSpec(config.model, config.pretrained, config.model_config_file), pretrained):
        model, train_transform, val_transform = open_clip.create_model_and_transforms(
            config.model, pretrained=pretrained, precision="fp32", device="cpu", output_dict=True)
    return BuiltModel(model, train_transform, val_transform, open_clip.get_tokenizer(config.model))


def lock_image_tower(model: torch.nn.Module, unlocked_groups: int) -> None:
    """open_clip's `lock_image_tower`, except that leaving as many layer groups trainable as the tower has (or
    more), which open_clip does without a word, locking nothing, is a UserError naming how many it has."""
    model.lock_image_tower(unlocked_groups=unlocked_groups)
    if unlocked_groups and all(p.requires_grad for p in model.visual.parameters()):
        resblocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
        groups = f" of its {len(resblocks) + 2}" if resblocks is not None else ""  # open_clip's ViT: layers + 2
        raise UserError(f"lock_image_unlocked_groups {unlocked_groups} leaves all{groups} layer groups of the image "
                        "tower trainable, so nothing is locked: give fewer, or leave out lock_image")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip_train makes them: no decay on norms, biases, embeddings of one dim, logit_scale."""
    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def _encode_text_trimmed(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` on the first L positions, L = the batch's last end-of-text token + 1.

    Tokens on the CPU are cut here; tokens on a GPU (or in a compiled graph)
    run as given, L being their width: finding L there would stall the host
    until the GPU caught up (or break the graph), so the trainer's loader cuts
    them before they leave the host (`finetune_data.collate`). Uncut tokens
    give the same features, at the cost of the whole context.
    """
    from open_clip.transformer import text_global_pool

    if text.device.type == "cpu" and not torch.compiler.is_compiling():  # compiled, the loader has cut them
        # The end-of-text token has the highest id (argmax pooling).
        text = text[:, : int(text.argmax(dim=-1).max()) + 1]
    length = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:length].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_context(model: torch.nn.Module, sample_tokens: torch.Tensor) -> bool:
    """Install the trimmed text pass on `model` when it is sound for it; True when installed.

    Sound for open_clip's `CLIP` with a causal mask and end-of-text (argmax)
    pooling; checked on `sample_tokens` (real captions) against the full pass.
    """
    import open_clip

    if type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or model.attn_mask is None:
        log.info("text tower runs on the full context (%s): no causal end-of-text pooling to trim for",
                 type(model).__name__)
        return False
    was_training = model.training
    model.eval()
    with torch.no_grad():
        full = model.encode_text(sample_tokens, normalize=True)
        trimmed = _encode_text_trimmed(model, sample_tokens, normalize=True)
    model.train(was_training)
    if not torch.allclose(full, trimmed, atol=1e-4):
        log.warning("trimmed text pass disagrees with open_clip's (max difference %.2e): using the full context",
                    float((full - trimmed).abs().max()))
        return False
    model.encode_text = types.MethodType(_encode_text_trimmed, model)
    return True
