"""Loading an encoder's weights, said in one line when it fails: a file that is no weights file or not this model's,
a tag the model does not have, a tag the Hugging Face Hub cannot be reached for. open_clip's own log lines are held
back meanwhile, so that a failure is our line alone."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from clipforge.errors import UserError
from clipforge.models.pretrained import names_weights_file

if TYPE_CHECKING:
    from clipforge.models.encoders import EncoderSpec


# What loading a weights file that is not one, or not this model's, raises: torch.load's unpickler (a file of
# something else), load_state_dict (other shapes or keys), open_clip's asserts on some shapes, a bad path, and
# open_clip's `next(iter(state_dict.items()))` on a state dict with nothing in it.
WEIGHTS_ERRORS = (RuntimeError, ValueError, OSError, KeyError, AssertionError, EOFError, pickle.UnpicklingError,
                  StopIteration)


@contextlib.contextmanager
def loading_weights(spec: EncoderSpec, local_weights: str | None = None, say: bool = True):
    """Around open_clip's factory: what a weights file or tag that does not load raises becomes one UserError.
    `local_weights`: the local copy of a weights file (of an s3:// one), looked at only when it does not load.
    `say`: let open_clip's own log lines through once it loaded (a check's are dropped).

    A tag that is not one of the model's is refused before the factory runs (which would log a line of its
    own before failing). A tag is fetched from the Hugging Face Hub, whose client retries each file five
    times (about 50 s for one open_clip tag) when the hub cannot be reached. When the hub's host does not
    even resolve (no network), the factory runs in the hub's offline mode instead: weights in the local
    cache still load, and missing ones fail at once."""
    import open_clip
    from huggingface_hub import constants

    is_tag = bool(spec.pretrained) and not names_weights_file(spec.pretrained)
    if is_tag and ":" not in spec.model and not open_clip.get_pretrained_cfg(spec.model, spec.pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.model)) or "none"
        raise UserError(f"pretrained {spec.pretrained!r} is neither a weights file nor a pretrained tag of model "
                        f"{spec.model} (its tags: {tags})")
    host = unresolvable_hub_host() if is_tag else None
    if host:
        constants.HF_HUB_OFFLINE = True
    held = HeldLogRecords(Path(open_clip.__file__).parent)
    logging.getLogger().addFilter(held)
    try:
        yield
        if say:
            held.release()
        else:
            held.records.clear()
    except WEIGHTS_ERRORS as exc:
        if host and ("download" in str(exc).lower() or isinstance(exc, OSError)):  # open_clip: "Failed to download"
            raise UserError(f"cannot load model {spec.model} with weights {spec.pretrained}: they are not in the "
                            f"local Hugging Face cache, and {host} cannot be reached") from None
        raise UserError(weights_problem(spec, exc, local_weights)) from None
    finally:
        logging.getLogger().removeFilter(held)
        if host:
            constants.HF_HUB_OFFLINE = False


class HeldLogRecords(logging.Filter):
    """Holds back what open_clip logs on the root logger while weights load: when they fail to load, the
    UserError says it in one line (open_clip's own "Failed to download ..." is that line's raw twin); when
    they load, `release` logs what was held."""

    def __init__(self, package: Path):
        super().__init__()
        self.package, self.records = str(package), []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(self.package):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        logging.getLogger().removeFilter(self)
        for record in self.records:
            logging.getLogger().handle(record)
        self.records.clear()


def unresolvable_hub_host() -> str | None:
    """The Hugging Face Hub's host name if it does not resolve here (and no proxy resolves it for us), else None.
    None too in the hub's offline mode (HF_HUB_OFFLINE=1), which the hub client honours on its own."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or proxied:
        return None
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return host
    return None


def one_line(text: str, limit: int = 300) -> str:
    """`text` cut to about `limit` characters at the end of a sentence, or else of a word, never mid-word."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence = head.rfind(". ")
    if sentence > limit // 2:
        return head[: sentence + 1]
    return head[: head.rfind(" ")].rstrip(",;:") + " ..." if " " in head else head + "..."


def weights_problem(spec: EncoderSpec, exc: Exception, local_weights: str | None = None) -> str:
    """One line for a checkpoint that does not load: the first mismatching key, not torch's whole list."""
    if isinstance(exc, StopIteration):
        return f"weights {spec.pretrained} hold no parameters (an empty state dict)"
    if isinstance(exc, pickle.UnpicklingError | EOFError) or not is_weights_format(local_weights):
        return f"weights {spec.pretrained} are not a PyTorch or safetensors weights file (a state dict saved by " \
               "torch.save, or .safetensors)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # open_clip's own check of a position embedding's width ("text pos_embed width changed!") is a misfit too.
    for marker in ("size mismatch", "Missing key", "Unexpected key", "width changed"):
        hit = next((line for line in lines if marker in line), None)
        if hit:
            return f"weights {spec.pretrained} do not fit model {spec.model}: {one_line(hit)}"
    first = lines[0] if lines else type(exc).__name__
    return f"cannot load model {spec.model} with weights {spec.pretrained}: {one_line(first)}"


def is_weights_format(path: str | None) -> bool:
    """Whether a local file begins as a weights file open_clip loads does: a zip archive (torch.save since 1.6,
    TorchScript, .npz), a legacy torch pickle, or safetensors (a little-endian header length, then its JSON).
    True too for no file at all: then the loader's own error says more."""
    if not path or not Path(path).is_file():
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return head.startswith((b"PK\x03\x04", b"\x80")) or (len(head) == 9 and head[8:9] == b"{")
