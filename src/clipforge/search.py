"""Text (or image) search over an embedding cache of an image collection.

The query is encoded by the model the cache was built with — read from the
cache's metadata by default — and compared by cosine with every row: exact
search over the normalised matrix, one matrix-vector product (fine up to
about a million rows), or with `faiss=True` an inverted-file FAISS index built
once and saved next to the cache. A different model is refused, since its
embeddings live in another space. The CLI and the search page both call
`Searcher`, so they return the same results in the same order.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.data.embeddings import EmbeddingTable, read_embeddings
from clipforge.data.image_folder import collection_root, image_uri, is_image_collection
from clipforge.data.pixels import unreadable, upright_rgb
from clipforge.errors import UserError
from clipforge.models.encode import encode_batch, resolve_device
from clipforge.models.encoders import EncoderSpec, load_clip, names_weights_file, weights_digest, weights_identity
from clipforge.models.preprocess import BatchPreprocess
from clipforge.storage import uri as storage
from clipforge.storage.manifest import digest

log = logging.getLogger("clipforge.search")

# A query image's pixels: a 50 MP phone photo is taken whole; a 200 MP one, a JPEG, is decoded at half size.
MAX_QUERY_PIXELS = 64_000_000
# Rows FAISS is asked for beyond k, so that a group of tied scores (one image indexed several times) straddling
# the k-th place is ordered by row, as exact search orders it, not cut where FAISS's heap happens to.
TIE_MARGIN = 64


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    path: str


def _check_relative_paths(index: str, recorded: dict[str, str | None], built_in: str | None) -> None:
    """A cache records the files its model came from as they were given: relative ones resolve from the
    directory it was built in (a pipeline's working directory), so say that rather than "not found"; and
    where that directory is this one, that the file is gone."""
    for (what, flag), path in recorded.items():
        if path and not path.startswith("s3://") and "/" in path and not Path(path).is_absolute() \
                and not Path(path).exists():
            if built_in and os.path.abspath(built_in) == os.getcwd():
                raise UserError(f"index {index} was built with {what} {path}, which is not there any more "
                                f"(deleted, or pruned?); give {flag} with the file it was built with")
            where = f" ({built_in})" if built_in else ""
            raise UserError(f"index {index} was built with {what} {path}, relative to the directory it was built "
                            f"in{where}; run this from there, or give {flag} with its path from here")


def from_build_dir(path: str | None, built_in: str | None) -> str | None:
    """A relative local path an index recorded, as seen from here: itself where it resolves here, else the same
    path under the directory the index was built in, where it is there (searching from another directory)."""
    if not path or not built_in or storage.is_s3(path) or Path(path).is_absolute() or Path(path).exists():
        return path
    there = os.path.join(built_in, path)
    return there if os.path.exists(there) else path


def query_encoder(index: str, built: dict, model: str | None, pretrained: str | None,
                  model_config: str | None) -> EncoderSpec:
    """The encoder for queries: the one the index was built with, found where the user says (the same
    weights file from another directory) or where the index recorded it. Another model name or tag is
    refused: its embeddings live in another space (`check_same_weights` compares weights files)."""
    name, recorded = built.get("name"), built.get("pretrained")
    if recorded == "":  # `--pretrained ''`: each load draws new random weights, which the index never saw
        raise UserError(f"index {index} was built with random weights (pretrained ''), for benchmarks and tests: "
                        "no query encodes into its space; build it with a weights file or tag")
    same = (model or name) == name
    if same and pretrained and pretrained != recorded:
        if not names_weights_file(pretrained):
            same = False  # another open_clip tag
        elif not storage.exists(pretrained):
            raise UserError(f"--pretrained {pretrained} not found")
        elif not built.get("weights"):
            same = False  # a file for an index of a tag's weights: a fine-tune of them, another space
    if not same:
        raise UserError(f"index {index} was built with model {name} ({recorded}); {model or name} "
                        f"({pretrained or recorded}) embeds into another space")
    return EncoderSpec(model=name, pretrained=pretrained or recorded,
                       model_config=model_config or built.get("model_config"))


def check_same_weights(index: str, built: dict | None, pretrained: str | None) -> None:
    """Refuse a weights file with other contents than the index was built with: two fine-tunes of one
    architecture have the same size, and weights overwritten in place keep their name. The recorded file
    unchanged (size and mtime, or ETag) is not read again; an index of before content digests compares sizes."""
    if not built or not names_weights_file(pretrained):
        return
    found = weights_identity(pretrained)
    if all(built.get(key) == value for key, value in found.items()):  # the recorded file, unchanged
        return
    if built.get("sha256"):
        same, how = weights_digest(pretrained) == built["sha256"], "contents (sha256)"
    else:
        same, how = found.get("size") == built.get("size"), "size"
    if not same:
        changed = "was changed since" if pretrained == built.get("uri") else "is not the file"
        raise UserError(f"weights {pretrained} {changed} index {index} was built with (other {how}): its "
                        "embeddings would live in another space; index the folder again with these weights")


class Searcher:
    """Holds a cache and its model; `text(query, k)` and `image(bytes, k)` return the k best hits."""

    def __init__(self, index: str, model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, device: str = "cpu", faiss: bool = False):
        self.table = read_embeddings(index, "index")
        built_in = self.table.manifest.get("directory")
        spec = query_encoder(index, self.table.model, model, pretrained, model_config)
        # The files the index recorded (not those given here) are found from the directory it was built in too;
        # `check_same_weights` then checks the weights are the ones it recorded.
        self.spec = replace(spec, model_config=from_build_dir(spec.model_config, built_in) if not model_config
                            else spec.model_config,
                            pretrained=from_build_dir(spec.pretrained, built_in)
                            if not pretrained and names_weights_file(spec.pretrained) else spec.pretrained)
        _check_relative_paths(index, {("model config", "--model-config"): self.spec.model_config,
                                      ("weights", "--pretrained"): self.spec.pretrained}, built_in)
        check_same_weights(index, self.table.model.get("weights"), self.spec.pretrained)
        self.device = resolve_device(device)
        self.model, preprocess_cfg = load_clip(self.spec, self.device)
        self.preprocess = BatchPreprocess(preprocess_cfg, self.device)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(self.spec.model)
        source = self.table.manifest.get("config", {}).get("source", "")
        self.root = from_build_dir(collection_root(source), built_in) if source and is_image_collection(source) \
            else None
        if self.root and not storage.is_s3(self.root) and not Path(self.root).is_dir():
            # Results still come (the embeddings are in the index); their files cannot be shown or opened.
            where = "relative to the directory the index was built in; run from there" \
                if self.root_is_elsewhere() else "moved or deleted since it was indexed"
            log.warning("the indexed folder %s is not there (%s): results will name files that cannot be shown",
                        self.root, where)
        self.matrix = torch.from_numpy(self.table.embeddings).to(self.device)
        self.faiss = FaissIndex(index, self.table) if faiss else None

    def root_is_elsewhere(self) -> bool:
        """The indexed folder was given relative to the directory the index was built in, and does not
        resolve from here: every hit names a file that is not here (which does not mean it is gone)."""
        return bool(self.root) and not storage.is_s3(self.root) and not Path(self.root).is_absolute() \
            and not Path(self.root).is_dir()

    @torch.inference_mode()
    def text(self, query: str, k: int = 10) -> list[Hit]:
        if not query.strip():
            raise UserError("empty query")
        features = self.model.encode_text(self.tokenizer([query]).to(self.device))
        return self._top(features, k)

    def cut_note(self, query: str) -> str | None:
        """What to tell of a text query longer than the text encoder's context (CLIP's 77 tokens): its words
        past that count for nothing, which nothing else would say. None when it fits. Call it where the queries
        run (one thread): a Hugging Face tokenizer must not be used by two threads at once."""
        context = self.tokenizer.context_length
        if len(query) + 2 <= context:  # a token covers a character at least: it fits, and nothing is counted
            return None
        wide = self.tokenizer([query], context_length=4 * context)  # room to count what the model's cuts
        pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None) or 0  # HF's, else 0
        if int((wide[0] != pad).sum()) <= context:
            return None
        return f"only the first {context} tokens of the query count: the model reads no further"

    @torch.inference_mode()
    def image(self, data: bytes, k: int = 10, name: str | None = None) -> list[Hit]:
        """The k nearest rows to an image's bytes; `name` (its file) is what an error names."""
        what = f"the query image {name}" if name else "the query image"
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(upright_rgb(within_query_size(image, what)))
        except UserError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt files
            raise UserError(f"{what} {unreadable(exc)}") from None
        return self._top(encode_batch(self.model, self.preprocess(pixels[None]), "fp32"), k)

    def _top(self, features: torch.Tensor, k: int) -> list[Hit]:
        if k < 1:
            raise UserError(f"k: {k} results asked for; it must be at least 1")
        query = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        if self.faiss is not None:
            scores, rows = self.faiss.search(query.cpu().numpy(), k)
        else:
            scores, rows = top_rows(self.matrix @ query, k)
        hits = []
        for score, row in zip(scores, rows, strict=True):
            row_id = str(self.table.ids[row])
            hits.append(Hit(row_id, round(float(score), 6), image_uri(self.root, row_id) if self.root else row_id))
        return hits


def within_query_size(image: Image.Image, what: str) -> Image.Image:
    """`image`, not yet decoded, at most MAX_QUERY_PIXELS: a JPEG over that decodes at 1/2 to 1/8 of its size
    (the model sees 224 px), anything else is refused. A 400 KB PNG can hold 400 M pixels (5 GB decoded)."""
    if image.width * image.height > MAX_QUERY_PIXELS:
        image.draft("RGB", (1024, 1024))  # JPEG only (a no-op for others): the smallest scale still >= 1024 px
    if image.width * image.height > MAX_QUERY_PIXELS:
        raise UserError(f"{what} is {image.width}x{image.height} px, over {MAX_QUERY_PIXELS // 1_000_000} M "
                        "pixels: send a smaller copy (or a JPEG, decoded at a fraction of its size)")
    return image


def top_rows(scores: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The k best (score, row), ties in row order: pages of a ranking (the top offset+k, less the first offset)
    then agree at their edges, where torch.topk orders equal scores (duplicate images) differently for each k
    and a page would show one twice and lose the other."""
    k = min(k, len(scores))
    scores = torch.nan_to_num(scores, nan=-math.inf)  # a NaN row (a damaged embedding) ranks last, not first
    kth = torch.topk(scores, k).values[-1]
    rows = torch.nonzero(scores >= kth).squeeze(1)  # every row tied with the k-th too
    values = scores[rows].float().cpu().numpy()
    rows = rows.cpu().numpy()
    order = np.lexsort((rows, -values))[:k]
    return values[order].tolist(), rows[order].tolist()


class FaissIndex:
    """Approximate search for collections past ~1M rows: an inverted-file index (IVF, inner product on
    the normalised rows) in `CACHE.faiss/ivf<lists>-<key>.index`, next to the cache. The key hashes the
    cache's manifest, so a rebuilt cache gets a new index and an unchanged one reuses its file. A query
    scans `nprobe` of the `nlist` lists; with one list (small caches) that is exact search."""

    def __init__(self, cache: str, table: EmbeddingTable):
        import faiss

        rows, dim = table.embeddings.shape
        self.nlist = max(1, min(int(4 * math.sqrt(rows)), rows // 39))  # FAISS wants >= 39 rows per list
        self.uri = storage.join(f"{cache.rstrip('/')}.faiss", f"ivf{self.nlist}-{digest(table.manifest)}.index")
        self.reused = storage.exists(self.uri)
        if self.reused:
            try:
                self.index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(self.uri), dtype=np.uint8))
                self.reused = self.index.ntotal == rows and self.index.d == dim
            except RuntimeError as exc:  # a file cut short or damaged: faiss says "read error"
                log.warning("FAISS index %s cannot be read (%s): building it again", self.uri,
                            str(exc).strip().splitlines()[-1][:120])
                self.reused = False
        if not self.reused:
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(table.embeddings)
            self.index.add(table.embeddings)
            try:
                storage.write_bytes(self.uri, faiss.serialize_index(self.index).tobytes())
            except OSError as exc:
                log.warning("FAISS index not saved to %s (%s); it is rebuilt next time", self.uri, exc)
        self.index.nprobe = min(self.nlist, max(8, self.nlist // 16))
        log.info("FAISS index %s: %d rows in %d lists, %d scanned per query (%s)", self.uri, rows, self.nlist,
                 self.index.nprobe, "reused" if self.reused else "built")

    def search(self, query: np.ndarray, k: int) -> tuple[list[float], list[int]]:
        """The k best (score, row) FAISS finds, ties in row order as exact search has them. FAISS orders equal
        scores (duplicate images) by its heap, differently for each k, so pages of one ranking (the top
        offset+k less the first offset) repeated some rows and never showed others: it is asked for TIE_MARGIN
        more, which are sorted by (score, row) and cut."""
        scores, rows = self.index.search(query[None].astype(np.float32), min(k + TIE_MARGIN, self.index.ntotal))
        found = rows[0] >= 0  # fewer than k rows in the lists scanned
        ranked = sorted(zip(scores[0][found].tolist(), rows[0][found].tolist(), strict=True),
                        key=lambda hit: (-hit[0], hit[1]))[:k]
        return [score for score, _ in ranked], [row for _, row in ranked]
