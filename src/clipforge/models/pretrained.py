"""What a `pretrained` value names: a weights file, or an open_clip tag such as 'openai'.

Torch-free, so that checking a pipeline spec need not import torch.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")  # a file's name, never an open_clip tag


def names_weights_file(pretrained: str | None) -> bool:
    """Whether `pretrained` is a weights file (local or s3://) rather than an open_clip tag such as 'openai'.
    The one rule every stage uses: what loads a file must also fingerprint it, or a changed file goes unseen.
    A bare file name that is not there (a typo) is a file too, so it is "not found", not an unknown tag."""
    return bool(pretrained) and (pretrained.startswith("s3://") or "/" in pretrained
                                 or pretrained.endswith(WEIGHTS_SUFFIXES) or Path(pretrained).exists())
