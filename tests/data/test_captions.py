"""Caption preparation and augmentation on a synthetic captioned folder."""

import os

import pandas as pd
import pytest

from clipforge.cli import main
from clipforge.config.captions import AugmentConfig, PrepareConfig
from clipforge.data.augment import augment
from clipforge.data.captions import prepare
from clipforge.data.synthetic import write_captioned_dataset
from clipforge.errors import UserError


@pytest.fixture
def dataset(tmp_path):
    return write_captioned_dataset(tmp_path / "shapes", 30, size=32)


def csv(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_split_is_exact_disjoint_and_seeded(dataset, tmp_path):
    prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=3))
    train, val = csv(dataset / "train_original.csv"), csv(dataset / "val.csv")
    index = csv(dataset / "index.csv")
    assert len(val) == 6 and len(train) == 24
    assert set(train.filepath).isdisjoint(val.filepath)
    assert sorted(pd.concat([train, val]).itertuples(index=False)) == sorted(index.itertuples(index=False))
    first = (dataset / "val.csv").read_text()
    prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=3))
    assert (dataset / "val.csv").read_text() == first
    prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=4))
    assert (dataset / "val.csv").read_text() != first


def test_missing_index_message(tmp_path, capsys):
    assert main(["captions", "prepare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"No index.csv found in {tmp_path}: it needs one row per image, columns filepath,caption" in err


def test_missing_and_corrupt_images_are_named_or_skipped(dataset):
    (dataset / "circle" / "0001.png").unlink()
    corrupt = csv(dataset / "index.csv").filepath[13]
    (dataset / corrupt).write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"image circle/0001.png .* not found \(and 1 more"):
        prepare(PrepareConfig(dataset=str(dataset)))
    summary = prepare(PrepareConfig(dataset=str(dataset), skip_bad=True))
    assert summary["skipped_bad"] == 2 and summary["rows"] == 28
    assert not (dataset / "train.csv").exists()


def test_empty_caption_is_named(dataset):
    text = (dataset / "index.csv").read_text().replace("a green circle", " ", 1)
    (dataset / "index.csv").write_text(text)
    with pytest.raises(UserError, match="row 3: empty caption for circle/0001.png"):
        prepare(PrepareConfig(dataset=str(dataset)))


def test_hand_edited_index_mistakes_are_one_line_each(dataset, capsys):
    """An unquoted comma in a caption and a Latin-1 file name the file and the line, without a traceback."""
    index = dataset / "index.csv"
    lines = index.read_text().splitlines()
    lines[5] = lines[5] + ", gloomy"
    index.write_text("\n".join(lines) + "\n")
    assert main(["captions", "prepare", str(dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{index}: line 6 has 3 fields, the header 2; put double quotes around" in err
    lines[5] = lines[5].replace(", gloomy", " caf\u00e9")
    index.write_bytes("\n".join(lines).encode("latin-1"))
    assert main(["captions", "prepare", str(dataset)]) == 2
    assert f"{index} line 6: byte 0xe9 is not UTF-8" in capsys.readouterr().err


def test_a_comma_in_every_caption_is_refused_not_read_as_row_labels(dataset):
    """pandas would use the first column as the index when every row has one field too many; the
    captioning page would then rewrite index.csv without its paths."""
    index = dataset / "index.csv"
    header, *rows = index.read_text().splitlines()
    index.write_text("\n".join([header, *(row + ", round" for row in rows)]) + "\n")
    with pytest.raises(UserError, match="line 2 has 3 fields, the header 2; put double quotes"):
        prepare(PrepareConfig(dataset=str(dataset)))


def test_header_case_and_spaces_are_forgiven(dataset):
    index = dataset / "index.csv"
    index.write_text(index.read_text().replace("filepath,caption", "Filepath, Caption ", 1))
    assert prepare(PrepareConfig(dataset=str(dataset)))["rows"] == 30


def test_a_failed_prepare_changes_nothing_and_a_newer_index_is_pointed_out(dataset, caplog):
    """A prepare that fails on the index leaves the split there was (it deleted the user's split, val.csv
    included); augment then says the index is newer than that split."""
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset)))
    before = {name: (dataset / name).read_bytes() for name in ("train_original.csv", "val.csv", "train.csv")}
    index = dataset / "index.csv"
    index.write_text(index.read_text() + "circle/gone.png,a lost circle\n")
    os.utime(index, (index.stat().st_atime, index.stat().st_mtime + 5))
    with pytest.raises(UserError, match="gone.png"):
        prepare(PrepareConfig(dataset=str(dataset)))
    assert {name: (dataset / name).read_bytes() for name in before} == before
    with caplog.at_level("WARNING"):
        augment(AugmentConfig(dataset=str(dataset)))
    assert "changed after the split was made" in caplog.text
    caplog.clear()
    prepare(PrepareConfig(dataset=str(dataset), skip_bad=True))
    augment(AugmentConfig(dataset=str(dataset)))
    assert (dataset / "train.csv").exists()
    prepare(PrepareConfig(dataset=str(dataset), skip_bad=True, seed=7))  # a new split: the augmented one goes
    assert not (dataset / "train.csv").exists()
    index.touch()
    os.utime(index, (index.stat().st_atime, index.stat().st_mtime + 5))
    with caplog.at_level("WARNING"):
        augment(AugmentConfig(dataset=str(dataset)))
    assert "changed after the split was made" in caplog.text


def test_the_dataset_may_be_named_by_its_index_or_with_a_trailing_slash(dataset, capsys):
    assert main(["captions", "prepare", f"{dataset}/index.csv"]) == 0
    assert (dataset / "val.csv").is_file()
    (dataset / "circle" / "0001.png").unlink()
    assert main(["captions", "prepare", f"{dataset}/"]) == 2
    assert f"in {dataset}/index.csv not found" in capsys.readouterr().err  # one slash


def test_a_name_typed_in_another_unicode_form_finds_its_file(tmp_path):
    """A folder copied from a Mac keeps café.png as NFD bytes; a hand-typed index.csv has the NFC form."""
    import unicodedata

    from PIL import Image

    from clipforge.data.image_folder import decode
    from clipforge.stages.finetune_data import read_rows

    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    for name in (nfd, "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "index.csv").write_text(f"filepath,caption\n{nfc},a red café\nb.png,a red square\n")
    assert prepare(PrepareConfig(dataset=str(tmp_path)))["rows"] == 2
    rows = read_rows(str(tmp_path / "index.csv"), "train_data")
    assert rows.uris[0] == str(tmp_path / nfd)
    assert decode(str(tmp_path), nfc)[0].shape == (8, 8, 3)


def test_a_swapped_word_takes_the_article_it_needs():
    import random

    from clipforge.data.augment import synonym_variants

    variants = synonym_variants("A red circle and an orange box", {"red": ["azure"], "orange": ["big"]}, 3,
                                random.Random(0))
    assert sorted(variants) == ["A red circle and a big box", "An azure circle and a big box",
                                "An azure circle and an orange box"]


def test_phrases_and_hyphenated_words_are_swapped_whole_and_only_whole():
    import random

    from clipforge.data.augment import SynonymMap, synonym_variants

    words = SynonymMap.of({"Red  Circle": ["crimson disc"], "t-shirt": ["tee"], "red": ["scarlet"], "cat": ["kitten"]})
    variants = synonym_variants("A red circle, a T-shirt and a red\ncircle; concatenate", words, 10, random.Random(0))
    assert "A crimson disc, a T-shirt and a red\ncircle; concatenate" in variants
    assert "A red circle, a Tee and a crimson disc; concatenate" in variants
    assert not any("scarlet" in v or "kitten" in v for v in variants)  # "red circle" first; "cat" is no word here
    assert synonym_variants("an apple", {"apple": ["pear"]}, 1, random.Random(0)) == ["a pear"]


def test_manual_augmentation_is_deterministic_and_never_repeats(dataset):
    prepare(PrepareConfig(dataset=str(dataset)))
    augment(AugmentConfig(dataset=str(dataset), per_sample=3, seed=1))
    first = csv(dataset / "train.csv")
    originals = csv(dataset / "train_original.csv")
    assert len(first) > len(originals)
    for path, group in first.groupby("filepath"):
        original = originals.loc[originals.filepath == path, "caption"].item()
        assert group.caption.iloc[0] == original
        assert group.caption.is_unique and len(group) <= 4
    augment(AugmentConfig(dataset=str(dataset), per_sample=3, seed=1))
    assert csv(dataset / "train.csv").equals(first)


def test_custom_synonym_map(dataset, tmp_path):
    prepare(PrepareConfig(dataset=str(dataset)))
    (tmp_path / "map.json").write_text('{"circle": ["ring"], "red": ["ruby"]}')
    augment(AugmentConfig(dataset=str(dataset), per_sample=3, synonyms=str(tmp_path / "map.json")))
    variants = set(csv(dataset / "train.csv").caption) - set(csv(dataset / "train_original.csv").caption)
    assert "a ruby ring" in variants and all("ring" in v or "ruby" in v for v in variants)


@pytest.mark.parametrize(("content", "message"), [
    ('{"red": [1, null]}', '"red" must map to a list of words (strings), not [1, null]'),  # JSON, as in the file
    ('{"red": ["ruby"], "blue": "navy"}', '"blue" must map to a list of words (strings), not "navy"'),
    ('["red"]', "must be a JSON object of word -> list of synonyms"),
])
def test_a_synonym_map_of_another_shape_names_the_word(tmp_path, content, message):
    from clipforge.data.augment import load_synonyms

    (tmp_path / "map.json").write_text(content)
    with pytest.raises(UserError) as info:
        load_synonyms(str(tmp_path / "map.json"))
    assert str(info.value).startswith(f"synonym map {tmp_path / 'map.json'}") and message in str(info.value)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer trained here, saved as a transformers folder (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llm")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    corpus = ["a red circle", "a blue square", "Paraphrase this image caption.", "Caption: Paraphrase: a shape"]
    tokenizer.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                               eos_token_id=fast.eos_token_id)).save_pretrained(folder)
    return folder


def test_llm_paraphrases_through_transformers(dataset, tiny_llm):
    prepare(PrepareConfig(dataset=str(dataset)))
    summary = augment(AugmentConfig(dataset=str(dataset), method="llm", llm_model=str(tiny_llm), per_sample=2))
    train = csv(dataset / "train.csv")
    assert summary["originals"] == 24 and len(train) > 24
    for _, group in train.groupby("filepath"):
        assert group.caption.is_unique


def test_a_language_model_that_cannot_be_loaded_is_an_error_not_a_synonym_map_run(dataset, tmp_path):
    """The model was named: training on the map's captions instead, with exit 0 and `augment: llm` on the
    model's card, would hide that it never ran. Nothing is written, so the next run tries again."""
    prepare(PrepareConfig(dataset=str(dataset)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    config = AugmentConfig(dataset=str(dataset), method="llm", llm_model=str(tmp_path / "broken"))
    for _ in range(2):
        with pytest.raises(UserError, match=f"^llm_model {tmp_path / 'broken'} cannot be loaded \\("):
            augment(config)
        assert not (dataset / "train.csv").exists() and not (dataset / "_augment.json").exists()


def test_checking_the_images_shows_progress(dataset, caplog):
    """Every image is decoded to check it: 400 large photos took 19 s without a word."""
    import re

    with caplog.at_level("INFO", logger="clipforge.captions"):
        prepare(PrepareConfig(dataset=str(dataset)))
    assert re.search(r"30/30 images checked, [\d.]+ images checked/s, ETA 0:00:00", caplog.text), caplog.text


def test_an_index_of_one_row_per_image_is_split_as_before_images_could_have_several(dataset):
    """Existing users' splits must not move: the val images of seed 3 before several captions per image."""
    prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=3))
    assert list(csv(dataset / "val.csv").filepath) == [
        "circle/0003.png", "circle/0012.png", "triangle/0020.png", "triangle/0023.png", "circle/0026.png",
        "circle/0027.png"]


def spell_each_image_twice(dataset):
    """index.csv with a second row per image, its path spelled another way and another caption; the first
    image's file named in NFD (as a Mac copy leaves it), its rows in NFC and NFD."""
    import unicodedata

    index = csv(dataset / "index.csv")
    nfc, nfd = (unicodedata.normalize(form, "caf\u00e9.png") for form in ("NFC", "NFD"))
    (dataset / index.filepath[0]).rename(dataset / nfd)
    spellings = [lambda p: f"./{p}", lambda p: str(dataset / p), lambda p: p.replace("/", "/./"),
                 lambda p: f"{p.split('/')[0]}/../{p}"]
    second = index.assign(filepath=[spellings[i % 4](p) for i, p in enumerate(index.filepath)],
                          caption=index.caption + ", seen again")
    index.loc[0, "filepath"], second.loc[0, "filepath"] = nfc, nfd
    pd.concat([index, second]).to_csv(dataset / "index.csv", index=False)


def test_one_image_spelled_two_ways_never_lands_on_both_sides(dataset):
    """`2.png` and `./2.png`, an absolute and a relative path, NFC and NFD names are one image: it is on one side
    of the split, which counts it once."""
    from clipforge.data.image_folder import image_identity, image_uri

    spell_each_image_twice(dataset)
    for seed in range(4):
        summary = prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=seed))
        sides = [{image_identity(image_uri(str(dataset), p)) for p in csv(dataset / name).filepath}
                 for name in ("train_original.csv", "val.csv")]
        assert sides[0].isdisjoint(sides[1]) and len(sides[0]) == 24 and len(sides[1]) == 6
        assert summary["images"] == 30 and summary["val_images"] == 6 and summary["rows"] == 60


def coco_style(dataset, captions_per_image=3):
    """index.csv with several rows per image, one per caption, the rows of an image scattered."""
    index = csv(dataset / "index.csv")
    rows = [(p, f"{c}, take {k}") for k in range(captions_per_image) for p, c in index.itertuples(index=False)]
    pd.DataFrame(rows, columns=["filepath", "caption"]).to_csv(dataset / "index.csv", index=False)
    return pd.DataFrame(rows, columns=["filepath", "caption"])


def test_several_captions_per_image_are_split_by_image(dataset, caplog):
    index = coco_style(dataset)
    with caplog.at_level("INFO", logger="clipforge.captions"):
        summary = prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=3))
    train, val = csv(dataset / "train_original.csv"), csv(dataset / "val.csv")
    assert set(train.filepath).isdisjoint(val.filepath)
    assert val.filepath.nunique() == 6 and len(val) == 18 and len(train) == 72  # val_fraction: of the images
    assert sorted(pd.concat([train, val]).itertuples(index=False)) == sorted(index.itertuples(index=False))
    assert summary | {"rows": 90, "train": 72, "val": 18, "images": 30, "train_images": 24, "val_images": 6} == summary
    assert "24 train images (72 rows) and 6 val images (18 rows)" in caplog.text
    first = (dataset / "val.csv").read_bytes()
    prepare(PrepareConfig(dataset=str(dataset), val_fraction=0.2, seed=3))
    assert (dataset / "val.csv").read_bytes() == first


def test_an_exact_repeat_is_dropped_with_a_warning_naming_it(dataset, caplog):
    index = coco_style(dataset, 2)
    with (dataset / "index.csv").open("a") as out:
        out.write("./circle/0001.png,\"a green circle, take 1\"\n")
    with caplog.at_level("WARNING", logger="clipforge.captions"):
        summary = prepare(PrepareConfig(dataset=str(dataset)))
    assert summary["rows"] == len(index) == 60 and summary["repeats_dropped"] == 1
    assert "repeats 1 row(s)" in caplog.text and './circle/0001.png "a green circle, take 1"' in caplog.text
    both = pd.concat([csv(dataset / "train_original.csv"), csv(dataset / "val.csv")])
    assert sorted(both.itertuples(index=False)) == sorted(index.itertuples(index=False))


def test_a_prepare_that_splits_as_before_keeps_the_augmented_train_csv(dataset, caplog):
    """Preparing again with the same index, seed and fraction makes the same split: the augmented train.csv
    made from it stays (a language model may have taken hours over it); another split removes it."""
    prepare(PrepareConfig(dataset=str(dataset), seed=3))
    augment(AugmentConfig(dataset=str(dataset), per_sample=2))
    augmented = (dataset / "train.csv").read_bytes()
    with caplog.at_level("INFO"):
        prepare(PrepareConfig(dataset=str(dataset), seed=3))
    assert (dataset / "train.csv").read_bytes() == augmented
    assert "train.csv, augmented from it, is kept" in caplog.text
    prepare(PrepareConfig(dataset=str(dataset), seed=3, val_fraction=0.3))
    assert not (dataset / "train.csv").exists()


def test_augmenting_again_with_nothing_changed_is_up_to_date_and_any_change_redoes_it(dataset, tmp_path, caplog):
    """A language model can take hours over a folder: a rerun with the same settings and inputs does nothing.
    Another setting, another synonym map or new training captions make it again (a hand-edited train.csv is
    refused: `test_a_hand_edited_train_csv_is_refused_not_overwritten`)."""
    prepare(PrepareConfig(dataset=str(dataset)))
    first = augment(AugmentConfig(dataset=str(dataset), per_sample=2))
    made = (dataset / "train.csv").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="clipforge.captions"):
        again = augment(AugmentConfig(dataset=str(dataset / "index.csv"), per_sample=2))  # named another way
    assert again == first and (dataset / "train.csv").stat().st_mtime_ns == made
    assert "train.csv is up to date" in caplog.text

    def redone(**settings) -> bool:
        before = (dataset / "train.csv").stat().st_mtime_ns
        augment(AugmentConfig(dataset=str(dataset), **{"per_sample": 2, **settings}))
        return (dataset / "train.csv").stat().st_mtime_ns != before

    assert redone(per_sample=3) and redone() and not redone()
    (tmp_path / "map.json").write_text('{"circle": ["ring"]}')
    assert redone(synonyms=str(tmp_path / "map.json")) and not redone(synonyms=str(tmp_path / "map.json"))
    (tmp_path / "map.json").write_text('{"circle": ["hoop"]}')
    assert redone(synonyms=str(tmp_path / "map.json"))
    originals = dataset / "train_original.csv"
    originals.write_text(originals.read_text().replace("circle", "disc"))
    assert redone(synonyms=str(tmp_path / "map.json"))
    assert "disc" in (dataset / "train.csv").read_text()


def test_a_prepare_that_splits_as_before_leaves_the_split_files_as_they_were(dataset):
    """Pipelines key a fine-tune on its CSVs' mtimes too: a rerun of `captions prepare` that makes the same split
    leaves them untouched. Once index.csv is newer, they are written again (augment compares their ages)."""
    LATER = 19 * 10**17  # 2030: after index.csv was written
    prepare(PrepareConfig(dataset=str(dataset)))
    split = [dataset / "train_original.csv", dataset / "val.csv"]
    for path in split:
        os.utime(path, ns=(LATER, LATER))
    prepare(PrepareConfig(dataset=str(dataset)))
    assert [path.stat().st_mtime_ns for path in split] == [LATER, LATER]
    os.utime(dataset / "index.csv", ns=(LATER + 1, LATER + 1))
    prepare(PrepareConfig(dataset=str(dataset)))
    assert all(path.stat().st_mtime_ns != LATER for path in split)


def test_a_synonym_map_that_is_not_there_is_named_as_the_setting(dataset, tmp_path):
    prepare(PrepareConfig(dataset=str(dataset)))
    with pytest.raises(UserError, match=f"^synonyms {tmp_path / 'nope.json'} not found: give a JSON map"):
        augment(AugmentConfig(dataset=str(dataset), synonyms=str(tmp_path / "nope.json")))
