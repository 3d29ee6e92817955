"""Caption augmentation: `train.csv` = each training caption plus up to N paraphrases.

`manual` swaps words for synonyms from a JSON map (word -> list); `llm` asks a
local causal language model (a transformers folder, no hub) for paraphrases and
falls back to the map, with a warning and a count, wherever it fails. Variants
never repeat the original or each other, and the same seed gives the same file.

`_augment.json` beside `train.csv` records its sha256 and what it was made from
(the settings, `train_original.csv`, the synonym map, the language model's
folder): a rerun with nothing changed is "up to date" and does nothing, since a
language model can take hours over a large folder. A run where the model failed
records no inputs, so the next one tries it again. A train.csv the record does
not vouch for (edited by hand since) is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import resources

import pandas as pd

from clipforge.config.captions import AugmentConfig
from clipforge.data.captions import (
    AUGMENTED,
    INDEX,
    TRAIN,
    TRAIN_ORIGINAL,
    augmented_problem,
    captions_csv,
    is_older,
    read_captions,
    read_record,
    sha256,
    vouched,
    write_vouched,
)
from clipforge.errors import UserError, first_line
from clipforge.progress import Progress
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.captions")


@dataclass(frozen=True)
class SynonymMap:
    """word or phrase (lower case, single spaces) -> its synonyms, and the pattern that finds the keys in a
    caption: whole words only, longest key first ("red circle" before "red"), any case, any spacing."""

    words: dict[str, list[str]]
    pattern: re.Pattern

    @classmethod
    def of(cls, words: dict[str, list[str]]) -> SynonymMap:
        words = {" ".join(key.lower().split()): synonyms for key, synonyms in words.items() if synonyms}
        keys = sorted((key for key in words if key), key=len, reverse=True)
        body = "|".join(r"\s+".join(map(re.escape, key.split())) for key in keys) or r"(?!)"
        return cls(words, re.compile(rf"(?<![\w'-])({body})(?![\w'-])", re.IGNORECASE))


def shipped_synonyms() -> str:
    return resources.files("clipforge.data").joinpath("synonyms.json").read_text()


def require_synonyms(path: str | None) -> None:
    """A synonym map named and not there, said as the setting it is rather than as a bare file."""
    if path and not storage.exists(path):
        raise UserError(f"synonyms {path} not found: give a JSON map of word -> synonyms, or leave it out for the "
                        "map shipped with clipforge")


def load_synonyms(path: str | None) -> SynonymMap:
    """The map from `path`, or the one shipped in the package."""
    require_synonyms(path)
    raw = storage.read_json(path) if path else json.loads(shipped_synonyms())
    if not isinstance(raw, dict):
        raise UserError(f"synonym map {path} must be a JSON object of word -> list of synonyms")
    for word, synonyms in raw.items():
        if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
            raise UserError(f"synonym map {path}: {json.dumps(word)} must map to a list of words (strings), not "
                            f"{json.dumps(synonyms)}")
    return SynonymMap.of({str(k): [str(s) for s in v if str(s).strip()] for k, v in raw.items()})


def _match_case(word: str, replacement: str) -> str:
    return replacement[:1].upper() + replacement[1:] if word[:1].isupper() else replacement


ARTICLE_BEFORE = re.compile(r"(?<![\w'-])(an?) $", re.IGNORECASE)


def _agree_article(parts: list[str], i: int) -> None:
    """"a red" -> "a azure" reads wrong: the article before a swapped-in word follows its first letter."""
    if i >= 1 and (article := ARTICLE_BEFORE.search(parts[i - 1])):
        fitting = _match_case(article.group(1), "an" if parts[i][:1].lower() in "aeiou" else "a")
        parts[i - 1] = parts[i - 1][: article.start(1)] + fitting + " "


def synonym_variants(caption: str, synonyms: SynonymMap | dict[str, list[str]], n: int,
                     rng: random.Random) -> list[str]:
    """Up to n distinct rewrites of `caption`, each swapping one or more words or phrases for synonyms."""
    synonyms = synonyms if isinstance(synonyms, SynonymMap) else SynonymMap.of(synonyms)
    parts = synonyms.pattern.split(caption)  # the text between keys, then a key found, and so on
    slots = list(range(1, len(parts), 2))
    variants: list[str] = []
    seen = {caption}
    for _ in range(20 * max(n, 1)):
        if len(variants) >= n or not slots:
            break
        chosen = rng.sample(slots, rng.randint(1, len(slots)))
        new = list(parts)
        for i in chosen:
            new[i] = _match_case(parts[i], rng.choice(synonyms.words[" ".join(parts[i].lower().split())]))
            _agree_article(new, i)
        text = "".join(new)
        if text not in seen:
            seen.add(text)
            variants.append(text)
    return variants


PROMPT = "Paraphrase this image caption.\nCaption: {caption}\nParaphrase:"


class LanguageModelParaphraser:
    """Paraphrases from a local causal LM; `None` where it gives nothing usable."""

    def __init__(self, model_path: str, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        if not storage.local_path(model_path).is_dir():
            raise UserError(f"llm_model {model_path} is not a local model folder")
        import torch

        set_seed(seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU node generates far faster
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path).eval().to(self.device)

    def __call__(self, caption: str, n: int) -> list[str]:
        import torch

        inputs = self.tokenizer(PROMPT.format(caption=caption), return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=32,
                                      num_return_sequences=max(n * 2, 1), pad_token_id=pad)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        variants, seen = [], {caption.strip().lower()}
        for text in texts:
            line = text.strip().split("\n")[0].strip()
            if line and line.lower() not in seen:
                seen.add(line.lower())
                variants.append(line)
        return variants[:n]


def warn_if_index_is_newer(dataset: str, split: str) -> None:
    """Captions edited after `prepare` made the split are not in it (local folders; S3 keeps no mtime here)."""
    index = storage.join(dataset, INDEX)
    if is_older(split, index):
        log.warning("%s changed after the split was made: run `clipforge captions prepare %s` again to "
                    "train on the changes", index, dataset)


def made_from(cfg: AugmentConfig, source: str) -> dict:
    """What train.csv is a function of: the settings and the content of everything they name."""
    def content(uri: str) -> dict:  # not where it is: the dataset may be named another way next time
        return {key: value for key, value in storage.content_fingerprint(uri).items() if key != "uri"}

    synonyms = content(cfg.synonyms) if cfg.synonyms else \
        {"shipped_sha256": hashlib.sha256(shipped_synonyms().encode()).hexdigest()}
    model = storage.tree_fingerprint(cfg.llm_model) if cfg.method == "llm" else None
    return {"settings": cfg.model_dump(mode="json", exclude={"dataset"}), "train_original": content(source),
            "synonyms": synonyms, "llm_model": model}


def recorded_summary(dataset: str, inputs: dict) -> dict | None:
    """The summary of the augmentation that made DATASET/train.csv from `inputs`, if that file is still its."""
    made, train = read_record(storage.join(dataset, AUGMENTED)), storage.join(dataset, TRAIN)
    if made.get("made_from") != inputs or not storage.exists(train) or \
            vouched(made).get(TRAIN, [None])[0] != sha256(storage.read_bytes(train)):
        return None
    return made.get("summary")


def augment(cfg: AugmentConfig) -> dict:
    """Write DATASET/train.csv from DATASET/train_original.csv, unless it is already made from them as asked."""
    source = storage.join(cfg.dataset, TRAIN_ORIGINAL)
    if not storage.exists(source):
        raise UserError(f"{source} not found: run `clipforge captions prepare {cfg.dataset}` first")
    warn_if_index_is_newer(cfg.dataset, source)
    require_synonyms(cfg.synonyms)
    inputs = made_from(cfg, source)
    if storage.exists(storage.join(cfg.dataset, TRAIN)) and \
            (why := augmented_problem(cfg.dataset, storage.read_bytes(source))):
        raise UserError(f"{why}: move it aside or delete it to augment again")
    summary = recorded_summary(cfg.dataset, inputs)
    if summary is not None:
        log.info("%s is up to date (%d captions + %d variants); nothing to do", storage.join(cfg.dataset, TRAIN),
                 summary["originals"], summary["variants"])
        return summary
    frame = read_captions(source)
    synonyms = load_synonyms(cfg.synonyms)
    rng = random.Random(cfg.seed)
    paraphrase, fallbacks = None, 0
    if cfg.method == "llm":
        try:
            paraphrase = LanguageModelParaphraser(cfg.llm_model, cfg.seed)
        except UserError:
            raise
        except Exception as exc:  # a model named and not loadable at all: said, not trained on without it
            raise UserError(f"llm_model {cfg.llm_model} cannot be loaded ({type(exc).__name__}: {first_line(exc)}); "
                            "give a transformers folder with a tokenizer and a causal language model, or use the "
                            "synonym map (method manual)") from None

    def variants_of(caption: str) -> tuple[list[str], bool]:
        """Up to `per_sample` variants of a caption, and whether the synonym map filled in for the model."""
        if paraphrase is None:
            return synonym_variants(caption, synonyms, cfg.per_sample, rng), False
        variants: list[str] = []
        if cfg.per_sample:
            try:
                variants = paraphrase(caption, cfg.per_sample)
            except Exception as exc:  # generation errors fall back per caption
                log.debug("llm failed on %r: %s", caption, exc)
        if len(variants) >= cfg.per_sample:
            return variants, False
        extra = synonym_variants(caption, synonyms, cfg.per_sample, rng)
        return variants + [v for v in extra if v not in variants][: cfg.per_sample - len(variants)], True

    rows = []
    progress = Progress(log, len(frame), unit="captions") if paraphrase is not None else None
    for filepath, caption in zip(frame["filepath"], frame["caption"], strict=True):
        variants, fell_back = variants_of(caption)
        fallbacks += fell_back
        rows.append((filepath, caption))
        rows.extend((filepath, v) for v in variants if v != caption)
        if progress is not None:  # a language model takes seconds a caption on a CPU
            progress.update(1)
    if cfg.method == "llm" and fallbacks:
        log.warning("the language model gave too few paraphrases for %d of %d captions; the synonym map "
                    "filled in", fallbacks, len(frame))
    out = pd.DataFrame(rows, columns=["filepath", "caption"])
    summary = {"originals": len(frame), "rows": len(out), "variants": len(out) - len(frame), "llm_fallbacks": fallbacks}
    if cfg.method == "manual" and cfg.per_sample and not summary["variants"]:
        log.warning("%s: no variants: %s", cfg.dataset, "the synonym map has no word with a synonym" if not
                    synonyms.words else "no training caption holds a word of the synonym map")
    complete = cfg.method == "manual" or (paraphrase is not None and not fallbacks)  # a failing model: try again
    # The record says "made from these" only once the file it vouches for is in.
    write_vouched(cfg.dataset, AUGMENTED, {TRAIN: captions_csv(out)},
                  {"made_from": inputs if complete else None, "summary": summary})
    log.info("%s: %d captions + %d variants -> train.csv", cfg.dataset, len(frame), len(out) - len(frame))
    return summary
