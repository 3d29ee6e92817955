"""Text (or image) search over an embedding cache of an image collection.

The query is encoded by the model the cache was built with — read from the
cache's metadata by default — and compared by cosine with every row: exact
search over the normalised matrix, one matrix-vector product. A different
model is refused, since its embeddings live in another space. The CLI and the
search page both call `Searcher`, so they return the same results in the same
order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clipforge.data.embeddings import read_embeddings
from clipforge.data.image_folder import collection_root, image_uri, is_image_collection
from clipforge.errors import UserError
from clipforge.models.encoders import EncoderSpec, load_clip
from clipforge.models.preprocess import BatchPreprocess


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    path: str


class Searcher:
    """Holds a cache and its model; `text(query, k)` and `image(bytes, k)` return the k best hits."""

    def __init__(self, index: str, model: str | None = None, pretrained: str | None = None,
                 model_config: str | None = None, device: str = "cpu"):
        self.table = read_embeddings(index)
        built = self.table.model
        if model and (model != built.get("name") or (pretrained or None) != built.get("pretrained")):
            raise UserError(f"index {index} was built with model {built.get('name')} "
                            f"({built.get('pretrained')}); {model} ({pretrained}) embeds into another space")
        self.spec = EncoderSpec(model=built["name"], pretrained=built.get("pretrained"),
                                model_config=model_config or built.get("model_config"))
        self.model, preprocess_cfg = load_clip(self.spec, device)
        self.preprocess = BatchPreprocess(preprocess_cfg, device)
        self.device = torch.device(device)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(self.spec.model)
        source = self.table.manifest.get("config", {}).get("source", "")
        self.root = collection_root(source) if source and is_image_collection(source) else None
        self.matrix = torch.from_numpy(self.table.embeddings).to(self.device)

    @torch.inference_mode()
    def text(self, query: str, k: int = 10) -> list[Hit]:
        if not query.strip():
            raise UserError("empty query")
        features = self.model.encode_text(self.tokenizer([query]).to(self.device))
        return self._top(features, k)

    @torch.inference_mode()
    def image(self, data: bytes, k: int = 10) -> list[Hit]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as exc:  # PIL raises many types for corrupt files
            raise UserError(f"the query image cannot be decoded ({type(exc).__name__})") from None
        return self._top(self.model.encode_image(self.preprocess(pixels[None])), k)

    def _top(self, features: torch.Tensor, k: int) -> list[Hit]:
        query = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        scores = self.matrix @ query
        k = min(k, len(scores))
        best = torch.topk(scores, k)
        hits = []
        for score, row in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            row_id = str(self.table.ids[row])
            hits.append(Hit(row_id, round(float(score), 6), image_uri(self.root, row_id) if self.root else row_id))
        return hits
