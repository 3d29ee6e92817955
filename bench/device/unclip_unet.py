"""The Stable unCLIP 2.1 UNet at full size, random weights, for timing the generate stage's denoising loop.

No hub here or on the device, so the config of
`stabilityai/stable-diffusion-2-1-unclip`'s `unet/config.json` is written out
below (the SD 2.1 768-v UNet plus a projection class embedding that takes the
noised 1024-D ViT-H/14 image embedding concatenated with its 1024-D noise-level
embedding). `tiny=True` keeps the structure with small widths, for a CPU check.
"""

from __future__ import annotations

import time

import torch

UNCLIP_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 2048,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}
TINY = {"attention_head_dim": [2, 2, 4, 4], "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 64,
        "projection_class_embeddings_input_dim": 64, "layers_per_block": 1, "sample_size": 16, "norm_num_groups": 8}


def unet_rate(device: str, batches: list[int], steps: int = 20, tiny: bool = False, repeat: int = 2) -> list[dict]:
    """Images/s of `steps` UNet calls per image at each batch size, with classifier-free guidance (each call
    takes 2 x batch latents, as StableUnCLIPImg2ImgPipeline's default guidance does), bf16 on a GPU."""
    from diffusers import UNet2DConditionModel

    config = {**UNCLIP_UNET, **(TINY if tiny else {})}
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        with torch.device(device):  # random init where the model runs: seconds, not a minute on the CPU
            unet = UNet2DConditionModel(**config)
    except (RuntimeError, TypeError):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).eval()
    params = sum(p.numel() for p in unet.parameters())
    side = config["sample_size"]
    results = []
    for batch in batches:
        latents = torch.randn(2 * batch, 4, side, side, device=device, dtype=dtype)
        text = torch.randn(2 * batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
        image_embeds = torch.randn(2 * batch, config["projection_class_embeddings_input_dim"], device=device,
                                   dtype=dtype)
        best = float("inf")
        with torch.inference_mode():
            for attempt in range(repeat + 1):  # the first is warm-up
                sync(device)
                start = time.perf_counter()
                for step in range(steps):
                    t = torch.full((2 * batch,), 999 - step * (1000 // steps), device=device)
                    unet(latents, t, encoder_hidden_states=text, class_labels=image_embeds)
                sync(device)
                if attempt:
                    best = min(best, time.perf_counter() - start)
        results.append({"batch": batch, "seconds_per_image": best / batch, "images_per_second": batch / best,
                        "unet_calls_per_second": steps / best})
    return [{**r, "params": params, "latent_side": side, "dtype": str(dtype).removeprefix("torch.")}
            for r in results]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
