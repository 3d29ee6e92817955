"""A tiny Stable unCLIP image-variation pipeline, built locally, for the demo and the tests.

Same classes and the same `save_pretrained` folder layout as
`stabilityai/stable-diffusion-2-1-unclip`, with small widths and random weights,
so the generate stage loads it by the code path real weights take. The CLIP
tokenizer files are derived from the BPE vocabulary open_clip ships (the same
vocabulary CLIP uses), since no hub is reachable.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of CLIP's BPE, in the layout transformers' CLIPTokenizer reads."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tiny_unclip(folder: str | Path, embed_dim: int, *, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a StableUnCLIPImg2ImgPipeline taking `embed_dim`-D image embeddings; images are 2x sample_size."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    hidden = 32
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=hidden, projection_dim=embed_dim, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, intermediate_size=37, patch_size=8)),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden, projection_dim=hidden,
            intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, vocab_size=len(tokenizer))),
        unet=UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64), attention_head_dim=(2, 4), class_embed_type="projection",
            # The class embedding is the noised image embedding concatenated with its noise level embedding.
            projection_class_embeddings_input_dim=embed_dim * 2, cross_attention_dim=hidden, layers_per_block=1,
            upcast_attention=True, use_linear_projection=True),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32),
    )
    pipe.save_pretrained(folder)
    return folder
