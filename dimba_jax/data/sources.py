"""Document sources: random-access sequences of document strings.

    open_source(spec, *, split="train", text_field="text", tfds_split="train",
                tfds_data_dir="", heldout_fraction=0.05) -> DocumentSource

A `DocumentSource` is a grain-compatible RandomAccessDataSource: `len(src)` documents,
`src[i] -> str`, plus `src.fingerprint` (a string that changes when the data changes; it keys
token caches) and `src.description`.

spec:
  * "embedded"            the public-domain books shipped in the package
                          (assets/embedded_train.jsonl.xz, assets/embedded_validation.jsonl.xz;
                          separate books, built by scripts/build_embedded_corpus.py).
  * "files:GLOB"          local files, `**` allowed; sorted by path. `.txt` = one document per
                          file; `.jsonl` / `.jsonl.xz` = one JSON record per line whose
                          `text_field` holds the document (the shared Gutenberg format).
                          Files are read into memory when opened.
  * "tfds:NAME[:SPLIT]"   a prepared TensorFlow Datasets dataset read through
                          `tfds.data_source` (array_record; TensorFlow is not needed). The tfds
                          split is SPLIT if given, else `tfds_split`; `text_field` names the
                          feature (bytes are decoded as UTF-8). Needs `pip install dimba_jax[tfds]`.

split: "train" | "validation" | "all".
  * embedded: its own training / held-out books; "all" = both.
  * files and tfds: "validation" is the last `heldout_fraction` of the documents (at least one),
    "train" the rest, "all" everything. Use "all" for training when a separate validation
    source is configured (`data.val_source`).

Errors: no matching files, a missing file, an unsupported extension, a record without the
text field, bad JSON, or a source without any non-empty document -> FileNotFoundError or
ValueError naming the file / field / spec. Empty documents are skipped.
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import importlib.resources
import json
import lzma
import os
from typing import Iterator, Sequence

SPLITS = ("train", "validation", "all")
SPEC_HELP = '"embedded", "files:GLOB" (.txt/.jsonl/.jsonl.xz) or "tfds:NAME[:SPLIT]"'
EMBEDDED_FILES = {"train": "embedded_train.jsonl.xz", "validation": "embedded_validation.jsonl.xz"}


class DocumentSource(Sequence[str]):
    """Random access to documents (str). Subclasses set `_docs` or override `__getitem__`."""

    fingerprint: str = ""
    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, {len(self)} documents)"


class ListSource(DocumentSource):
    """Documents held in memory as a tuple of str."""

    def __init__(self, docs: Sequence[str], *, description: str, fingerprint: str):
        self._docs = tuple(docs)
        self.description = description
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._docs[index]


class SubsetSource(DocumentSource):
    """Documents [start, stop) of a parent source, without copying."""

    def __init__(self, parent: DocumentSource, start: int, stop: int, *, tag: str):
        if not 0 <= start <= stop <= len(parent):
            raise ValueError(f"bad subset [{start}, {stop}) of {len(parent)} documents")
        self._parent, self._start, self._stop = parent, start, stop
        self.description = f"{parent.description} [{tag}: documents {start}..{stop - 1}]"
        self.fingerprint = f"{parent.fingerprint}[{start}:{stop}]"

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        return self._parent[self._start + index]


def limit_documents(source: DocumentSource, max_docs: int) -> DocumentSource:
    """The first `max_docs` documents of `source` (all of them when max_docs <= 0)."""
    if max_docs <= 0 or max_docs >= len(source):
        return source
    return SubsetSource(source, 0, max_docs, tag=f"max_docs={max_docs}")


def heldout_split(source: DocumentSource, split: str, heldout_fraction: float) -> DocumentSource:
    """Splits a source by document: the last `heldout_fraction` (>= 1 document) is "validation".

    Raises ValueError when a split would be empty (a single document cannot be split).
    """
    if split == "all":
        return source
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n = len(source)
    if n < 2:
        raise ValueError(
            f"{source.description} has {n} document(s): cannot hold out a validation part; "
            "give a separate validation source (data.val_source)"
        )
    n_val = min(n - 1, max(1, round(n * heldout_fraction)))
    if split == "validation":
        return SubsetSource(source, n - n_val, n, tag="held-out validation")
    return SubsetSource(source, 0, n - n_val, tag="train")


# ------------------------------------------------------------------------------ file reading
def iter_jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    """Yields `record[text_field]` of every line of a .jsonl or .jsonl.xz file (blank lines skipped).

    Raises ValueError naming the file and line for bad JSON, a non-object record, a missing
    field (listing the record's keys) or a non-string value.
    """
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(
                    f"{path}:{lineno}: record has no text field {text_field!r} "
                    f"(fields: {sorted(record)}); set data.text_field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


def _file_kind(path: str) -> str:
    for suffix, kind in ((".jsonl.xz", "jsonl"), (".jsonl", "jsonl"), (".txt", "txt")):
        if path.endswith(suffix):
            return kind
    raise ValueError(f"unsupported file type: {path} (expected .txt, .jsonl or .jsonl.xz)")


def _open_files(pattern: str, text_field: str) -> ListSource:
    if not pattern:
        raise ValueError(f"empty glob in data source spec; expected {SPEC_HELP}")
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match {pattern!r}")
    kinds = [_file_kind(p) for p in paths]  # validates every extension before reading anything
    docs: list[str] = []
    stats = []
    for path, kind in zip(paths, kinds):
        st = os.stat(path)
        stats.append(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
        if kind == "txt":
            with open(path, encoding="utf-8") as f:
                texts = [f.read()]
        else:
            texts = iter_jsonl_texts(path, text_field)
        docs.extend(t for t in texts if t.strip())
    if not docs:
        raise ValueError(f"files:{pattern} ({len(paths)} files) contains no non-empty documents")
    key = hashlib.sha256("\n".join(stats + [text_field]).encode()).hexdigest()[:16]
    return ListSource(docs, description=f"files:{pattern}", fingerprint=f"files-{key}")


# ------------------------------------------------------------------------------ embedded corpus
@functools.lru_cache(maxsize=None)
def _embedded_texts(part: str) -> tuple[str, ...]:
    asset = importlib.resources.files("dimba_jax.data").joinpath("assets", EMBEDDED_FILES[part])
    if not asset.is_file():
        raise FileNotFoundError(
            f"the embedded corpus file dimba_jax/data/assets/{EMBEDDED_FILES[part]} is missing; "
            "rebuild it with scripts/build_embedded_corpus.py"
        )
    with asset.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
        texts = tuple(json.loads(line)["text"] for line in f if line.strip())
    return tuple(t for t in texts if t.strip())


def embedded_records(part: str) -> list[dict]:
    """All records ({"id", "author", "title", "text"}) of the embedded corpus part "train"/"validation"."""
    asset = importlib.resources.files("dimba_jax.data").joinpath("assets", EMBEDDED_FILES[part])
    with asset.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _open_embedded(split: str) -> ListSource:
    parts = ("train", "validation") if split == "all" else (split,)
    docs = [t for part in parts for t in _embedded_texts(part)]
    return ListSource(docs, description=f"embedded[{split}]", fingerprint=f"embedded-v1-{split}-{sum(map(len, docs))}")


# ------------------------------------------------------------------------------ tfds
class TfdsSource(DocumentSource):
    """A tfds `data_source` (array_record) viewed as documents: record[text_field] decoded as UTF-8."""

    def __init__(self, name: str, split: str, text_field: str, data_dir: str = ""):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                "tfds sources need tensorflow-datasets: pip install 'dimba_jax[tfds]'"
            ) from e
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ...)
            where = f" in {data_dir}" if data_dir else ""
            raise FileNotFoundError(
                f"tfds dataset {name!r} split {split!r} not found or not prepared{where} "
                f"(array_record format is needed): {type(e).__name__}: {e}"
            ) from e
        self._text_field = text_field
        self.description = f"tfds:{name}:{split}"
        self.fingerprint = f"tfds-{name}-{split}-{data_dir}-{len(self._ds)}-{text_field}"
        if len(self._ds) == 0:
            raise ValueError(f"{self.description} has no examples")
        self[0]  # fail early on a missing text field

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        record = self._ds[index]
        if not isinstance(record, dict) or self._text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{self.description} example {index} has no text field {self._text_field!r} "
                f"(fields: {keys}); set data.text_field"
            )
        value = record[self._text_field]
        if hasattr(value, "item") and getattr(value, "shape", None) == ():
            value = value.item()
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            return value
        raise ValueError(f"{self.description} field {self._text_field!r} is {type(value).__name__}, not text")


def _split_tfds_spec(rest: str, tfds_split: str) -> tuple[str, str]:
    name, sep, split = rest.partition(":")
    if not name:
        raise ValueError(f"missing dataset name in tfds spec; expected {SPEC_HELP}")
    return name, (split if sep and split else tfds_split)


# ------------------------------------------------------------------------------ entry point
def open_source(
    spec: str,
    *,
    split: str = "train",
    text_field: str = "text",
    tfds_split: str = "train",
    tfds_data_dir: str = "",
    heldout_fraction: float = 0.05,
) -> DocumentSource:
    """Opens a document source (see the module docstring for `spec` and `split`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not isinstance(spec, str):
        raise ValueError(f"data source spec must be a string like {SPEC_HELP}, got {spec!r}")
    if spec == "embedded":
        return _open_embedded(split)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "files":
        return heldout_split(_open_files(rest, text_field), split, heldout_fraction)
    if sep and kind == "tfds":
        name, tsplit = _split_tfds_spec(rest, tfds_split)
        return heldout_split(TfdsSource(name, tsplit, text_field, tfds_data_dir), split, heldout_fraction)
    raise ValueError(f"unknown data source {spec!r}; expected {SPEC_HELP}")
