"""Document sources: embedded corpus, .txt / .jsonl / .jsonl.xz files, splits and errors."""

import importlib.resources
import json
import lzma

import pytest

from dimba_jax.data.sources import embedded_records, open_source


def write_jsonl(path, records, *, xz=False):
    opener = lzma.open if xz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((json.dumps(r) if not isinstance(r, str) else r) + "\n")


def test_txt_files_one_document_per_file_sorted(tmp_path):
    for name, text in [("b.txt", "second doc é"), ("a.txt", "first doc"), ("c.txt", "third\ndoc")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    src = open_source(f"files:{tmp_path}/*.txt", split="all")
    assert list(src) == ["first doc", "second doc é", "third\ndoc"]
    assert len(src) == 3 and src[-1] == "third\ndoc"


def test_jsonl_and_jsonl_xz_with_text_field(tmp_path):
    write_jsonl(tmp_path / "p1.jsonl", [{"body": "one", "id": 1}, "", {"body": "two"}])
    write_jsonl(tmp_path / "p2.jsonl.xz", [{"body": "three"}, {"body": "   "}, {"body": "four"}], xz=True)
    src = open_source(f"files:{tmp_path}/p*", split="all", text_field="body")
    assert list(src) == ["one", "two", "three", "four"]  # blank lines and empty documents skipped
    mixed = open_source(f"files:{tmp_path}/**/*.jsonl*", split="all", text_field="body")
    assert list(mixed) == list(src)


def test_heldout_split_is_the_tail_and_disjoint(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(40)])
    spec = f"files:{tmp_path}/d.jsonl"
    train = open_source(spec, split="train")
    val = open_source(spec, split="validation", heldout_fraction=0.05)
    assert list(val) == ["doc 38", "doc 39"]
    assert list(train) == [f"doc {i}" for i in range(38)]
    assert len(open_source(spec, split="validation", heldout_fraction=0.25)) == 10
    with pytest.raises(IndexError):
        train[38]


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        open_source(f"files:{tmp_path}/missing*.jsonl", split="all")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type.*x.csv"):
        open_source(f"files:{tmp_path}/x.csv", split="all")
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"content": "no text here"}])
    with pytest.raises(ValueError, match=r"nofield.jsonl:2: record has no text field 'text'.*content"):
        open_source(f"files:{tmp_path}/nofield.jsonl", split="all")
    write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        open_source(f"files:{tmp_path}/bad.jsonl", split="all")
    write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(ValueError, match="is int, not a string"):
        open_source(f"files:{tmp_path}/num.jsonl", split="all")
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "\n "}])
    with pytest.raises(ValueError, match="contains no non-empty documents"):
        open_source(f"files:{tmp_path}/empty.jsonl", split="all")
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(ValueError, match="cannot hold out a validation part"):
        open_source(f"files:{tmp_path}/one.txt", split="validation")


def test_spec_and_split_errors():
    with pytest.raises(ValueError, match="unknown data source 'hf:foo'.*embedded.*files:GLOB.*tfds:NAME"):
        open_source("hf:foo", split="train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        open_source("embedded", split="test")
    with pytest.raises(ValueError, match="empty glob"):
        open_source("files:", split="all")


def test_embedded_corpus_loads_english_with_separate_validation_books():
    train = open_source("embedded", split="train")
    val = open_source("embedded", split="validation")
    both = open_source("embedded", split="all")
    assert len(train) >= 20 and len(val) >= 2 and len(both) == len(train) + len(val)
    train_chars = sum(len(d) for d in train)
    assert 5_000_000 <= train_chars <= 20_000_000
    assert 100_000 <= sum(len(d) for d in val)
    words = train[0].lower().split()
    assert sum(w in {"the", "and", "of", "to", "a"} for w in words) > 0.05 * len(words)  # English
    train_ids = {r["id"] for r in embedded_records("train")}
    val_ids = {r["id"] for r in embedded_records("validation")}
    assert train_ids and val_ids and not train_ids & val_ids  # held out by book


def test_embedded_assets_are_package_files_of_bounded_size():
    assets = importlib.resources.files("dimba_jax.data").joinpath("assets")
    names = ["embedded_train.jsonl.xz", "embedded_validation.jsonl.xz", "bpe_8192.json"]
    sizes = {n: len(assets.joinpath(n).read_bytes()) for n in names}
    assert sizes["embedded_train.jsonl.xz"] + sizes["embedded_validation.jsonl.xz"] <= 4_200_000, sizes
