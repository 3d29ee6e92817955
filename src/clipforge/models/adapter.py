"""The adapter: a small network from one CLIP embedding space to another (512 -> 1024 for NSD).

Its shape is an `AdapterSpec` (plain JSON), its weights a safetensors file whose
metadata carries that spec, so `load_adapter` needs nothing else and never
unpickles. The output is always L2-normalised, like the CLIP embeddings it
imitates.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config.adapter import adapter_folder
from clipforge.errors import UserError
from clipforge.models.encoders import encoder_name, same_encoder
from clipforge.storage import uri as storage
from clipforge.storage.manifest import MANIFEST_NAME, manifest_uri, output_fingerprint
from clipforge.train.checkpoint_names import CHECKPOINTS_DIR

WEIGHTS_NAME = "adapter.safetensors"
CARD_NAME = "adapter.json"
SPEC_KEY = "clipforge_adapter"  # safetensors metadata key holding the AdapterSpec as JSON


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to build the network again; stored with the weights."""

    arch: str  # "linear" or "mlp"
    in_dim: int
    out_dim: int
    hidden_dim: int = 1024
    depth: int = 2
    dropout: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        return cls(**json.loads(text))


class LinearAdapter(nn.Module):
    """One linear map, then L2 normalisation."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.proj = nn.Linear(spec.in_dim, spec.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)


class ResidualBlock(nn.Module):
    """Pre-norm MLP block: x + W2 · dropout(GELU(W1 · LN(x)))."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x)))))


class ResidualMLPAdapter(nn.Module):
    """Project in, `depth` residual blocks, LayerNorm, project out, L2 normalise."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.proj_in = nn.Linear(spec.in_dim, spec.hidden_dim)
        self.blocks = nn.Sequential(*(ResidualBlock(spec.hidden_dim, spec.dropout) for _ in range(spec.depth)))
        self.norm = nn.LayerNorm(spec.hidden_dim)
        self.proj_out = nn.Linear(spec.hidden_dim, spec.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj_out(self.norm(self.blocks(self.proj_in(x)))).float(), dim=-1)


ARCHS: dict[str, type[nn.Module]] = {"linear": LinearAdapter, "mlp": ResidualMLPAdapter}


def build_adapter(spec: AdapterSpec) -> nn.Module:
    """A freshly initialised adapter (seed the global RNG first for reproducible weights)."""
    if spec.arch not in ARCHS:
        raise UserError(f"unknown adapter arch {spec.arch!r}: choose one of {', '.join(ARCHS)}")
    return ARCHS[spec.arch](spec)


def adapter_bytes(model: nn.Module, spec: AdapterSpec) -> bytes:
    """The weights as a safetensors file with the spec in its metadata."""
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    return safetensors.torch.save(state, metadata={SPEC_KEY: spec.to_json()})


def safetensors_metadata(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian header size, then a JSON header."""
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(bytes(data[8 : 8 + size])).get("__metadata__", {}) or {}


def adapter_identity(path: str) -> str | None:
    """What outputs made with an adapter record of it: its output's fingerprint (a folder, or the weights file
    in one), or for weights without a manifest (copied elsewhere) a hash of their bytes; None if none is there."""
    folder = adapter_folder(path)
    found = output_fingerprint(folder)
    if found is not None:
        return found
    weights = path if path.endswith(".safetensors") else storage.join(folder, WEIGHTS_NAME)
    return f"sha256:{hashlib.sha256(storage.read_bytes(weights)).hexdigest()}" if storage.exists(weights) else None


def check_finished(folder: str) -> None:
    """An adapter stage's output being trained (checkpoints, no `_manifest.json`) holds no result yet: files
    there may be an older run's, replaced by the next commit. Weights and card without checkpoints (a
    finished adapter copied elsewhere, or a bare weights file) are taken as they are."""
    if storage.exists(manifest_uri(folder)):
        return
    if CHECKPOINTS_DIR in storage.list_folders(folder):
        raise UserError(f"{folder} is incomplete (no {MANIFEST_NAME}): its training did not finish; "
                        "run train-adapter again to resume it")


def load_adapter(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained adapter, in eval mode, from an adapter stage's OUT (local or s3://) or its safetensors file.

    Only tensors and JSON are read: nothing is unpickled. The module carries its
    `spec` as an attribute.
    """
    uri = str(path)
    if not uri.endswith(".safetensors"):
        uri = storage.join(adapter_folder(uri), WEIGHTS_NAME)
    check_finished(adapter_folder(uri))
    if not storage.exists(uri):
        raise UserError(f"{uri} not found: is this an adapter stage output (with {WEIGHTS_NAME})?")
    data = storage.read_bytes(uri)
    try:
        spec = AdapterSpec.from_json(safetensors_metadata(data)[SPEC_KEY])
        state = safetensors.torch.load(data)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{uri} is not an adapter written by clipforge: {exc}") from None
    model = build_adapter(spec)
    model.load_state_dict(state)
    model.spec = spec
    return model.to(device).eval()


def check_trained_on(adapter: str, side: str, cache: str, model: dict) -> None:
    """The adapter was trained on embeddings of the encoder that made `cache` (`side`: "source" or "target").
    Another encoder of the same width passes every shape check and gives meaningless output. An adapter
    without its card (a bare .safetensors file copied alone) cannot say, and is taken as it is."""
    card = storage.join(adapter_folder(adapter), CARD_NAME)
    trained = (storage.read_json(card).get(f"{side}_model") or {}) if storage.exists(card) else {}
    if trained and model and not same_encoder(trained, model):
        raise UserError(f"adapter {adapter} was trained on {encoder_name(trained)} embeddings, but {cache} holds "
                        f"{encoder_name(model)} ones, another space")
