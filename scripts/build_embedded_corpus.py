"""Builds the embedded default corpus shipped inside the package.

Usage (from the repository root):

    python scripts/build_embedded_corpus.py [--corpus ../shared/data/gutenberg] \
        [--out dimba_jax/data/assets] [--train-mb 11.0] [--val-mb 0.8] [--seed 0]

Reads the Gutenberg books (`train-*.jsonl.xz`, `validation.jsonl.xz`; one JSON book per line),
keeps books whose text is at least 99.5% ASCII (plain English prose, no heavy diacritics),
and takes books in a seeded pseudo-random order until the raw text reaches `--train-mb` MB
from the training shards and `--val-mb` MB from the validation file (books longer than
`--max-book-chars` are skipped so the corpus has many authors). Writes
`embedded_train.jsonl.xz` and `embedded_validation.jsonl.xz` (records {"id", "author",
"title", "text"}, xz preset 9e) and prints their sizes. The validation books are from the
corpus's own validation split, so no book is in both files. The result is deterministic.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import lzma
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO_ROOT, "..", "shared", "data", "gutenberg")
DEFAULT_OUT = os.path.join(REPO_ROOT, "dimba_jax", "data", "assets")


def read_books(paths: list[str]) -> list[dict]:
    """All records of the given .jsonl.xz files, in file order."""
    books = []
    for path in paths:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            books.extend(json.loads(line) for line in f if line.strip())
    return books


def ascii_fraction(text: str) -> float:
    """Fraction of characters with code point < 128."""
    return len(text.encode("ascii", errors="ignore")) / max(1, len(text))


def select_books(books: list[dict], target_chars: int, *, seed: int, max_book_chars: int) -> list[dict]:
    """Books in a seeded hash order, filtered for ASCII prose, until `target_chars` is reached."""
    order = sorted(books, key=lambda b: hashlib.sha256(f"{seed}:{b['id']}".encode()).hexdigest())
    chosen, total = [], 0
    for book in order:
        text = book["text"]
        if len(text) > max_book_chars or ascii_fraction(text) < 0.995:
            continue
        chosen.append({k: book[k] for k in ("id", "author", "title", "text")})
        total += len(text)
        if total >= target_chars:
            break
    return chosen


def write_jsonl_xz(path: str, records: list[dict]) -> int:
    """Writes records as xz-compressed JSON lines; returns the file size in bytes."""
    tmp = path + ".tmp"
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="directory with train-*.jsonl.xz and validation.jsonl.xz")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (the package's assets)")
    p.add_argument("--train-mb", type=float, default=11.0, help="raw text of training books, in MB (1e6 chars)")
    p.add_argument("--val-mb", type=float, default=0.8, help="raw text of validation books, in MB")
    p.add_argument("--max-book-chars", type=int, default=600_000, help="skip books longer than this")
    p.add_argument("--max-total-bytes", type=int, default=4_200_000, help="fail if the two files exceed this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train_paths = sorted(glob.glob(os.path.join(args.corpus, "train-*.jsonl.xz")))
    val_path = os.path.join(args.corpus, "validation.jsonl.xz")
    if not train_paths:
        raise FileNotFoundError(f"no train-*.jsonl.xz files in {args.corpus}")
    if not os.path.isfile(val_path):
        raise FileNotFoundError(f"missing {val_path}")
    os.makedirs(args.out, exist_ok=True)

    sizes = {}
    for part, paths, mb in (("train", train_paths, args.train_mb), ("validation", [val_path], args.val_mb)):
        books = select_books(read_books(paths), int(mb * 1e6), seed=args.seed, max_book_chars=args.max_book_chars)
        out = os.path.join(args.out, f"embedded_{part}.jsonl.xz")
        sizes[part] = write_jsonl_xz(out, books)
        chars = sum(len(b["text"]) for b in books)
        print(f"{out}: {len(books)} books, {chars / 1e6:.2f} M chars, {sizes[part] / 1e6:.2f} MB compressed")
        for b in books:
            print(f"   {b['id']}  {b['author'][:30]:30s}  {b['title'][:60]!r}")
    total = sum(sizes.values())
    print(f"total {total / 1e6:.2f} MB")
    if total > args.max_total_bytes:
        sys.exit(f"embedded corpus is {total} bytes > --max-total-bytes {args.max_total_bytes}; lower --train-mb")


if __name__ == "__main__":
    main()
