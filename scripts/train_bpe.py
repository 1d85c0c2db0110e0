"""Trains the byte-level BPE tokenizer shipped in the package (run once; the result is committed).

Usage (from the repository root):

    python scripts/train_bpe.py [--corpus ../shared/data/gutenberg] [--vocab-size 8192] \
        [--sample-mb 30] [--out dimba_jax/data/assets/bpe_8192.json] [--seed 0]

Takes books from the Gutenberg training shards (`train-*.jsonl.xz`, never the validation
file) in a seeded pseudo-random order until `--sample-mb` MB of text, and trains a byte-level
BPE with the `tokenizers` library: ByteLevel pre-tokenizer (GPT-2 style regex split, no prefix
space) and decoder, the 256 byte symbols as the initial alphabet (so any string round-trips),
one special token "<|endoftext|>" (EOS, id 0), `--vocab-size` ids in all. Prints the
compression (characters per token) on a held-out slice of the validation file.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import lzma
import os
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO_ROOT, "..", "shared", "data", "gutenberg")
DEFAULT_OUT = os.path.join(REPO_ROOT, "dimba_jax", "data", "assets", "bpe_8192.json")
EOS_TOKEN = "<|endoftext|>"


def sample_texts(paths: list[str], target_chars: int, seed: int) -> list[str]:
    """Book texts from `paths` in a seeded hash order of their ids, until `target_chars`."""
    books = []
    for path in paths:
        with lzma.open(path, "rt", encoding="utf-8") as f:
            books.extend(json.loads(line) for line in f if line.strip())
    books.sort(key=lambda b: hashlib.sha256(f"{seed}:{b['id']}".encode()).hexdigest())
    texts, total = [], 0
    for b in books:
        texts.append(b["text"])
        total += len(b["text"])
        if total >= target_chars:
            break
    return texts


def train(texts: list[str], vocab_size: int):
    """Returns a trained `tokenizers.Tokenizer` (byte-level BPE, EOS special token first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    def chunks():  # feed ~1 MB pieces so progress and memory stay smooth
        for t in texts:
            for i in range(0, len(t), 1_000_000):
                yield t[i : i + 1_000_000]

    tok.train_from_iterator(chunks(), trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help="directory with train-*.jsonl.xz")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sample-mb", type=float, default=30.0, help="training text, in MB (1e6 chars)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    paths = sorted(glob.glob(os.path.join(args.corpus, "train-*.jsonl.xz")))
    if not paths:
        raise FileNotFoundError(f"no train-*.jsonl.xz files in {args.corpus}")
    t0 = time.time()
    texts = sample_texts(paths, int(args.sample_mb * 1e6), args.seed)
    print(f"{len(texts)} books, {sum(map(len, texts)) / 1e6:.1f} M chars ({time.time() - t0:.1f} s to read)")
    t0 = time.time()
    tok = train(texts, args.vocab_size)
    print(f"trained in {time.time() - t0:.1f} s; vocab {tok.get_vocab_size()}, eos id {tok.token_to_id(EOS_TOKEN)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out, pretty=False)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")

    val = os.path.join(args.corpus, "validation.jsonl.xz")
    if os.path.isfile(val):
        with lzma.open(val, "rt", encoding="utf-8") as f:
            sample = json.loads(f.readline())["text"][:200_000]
        ids = tok.encode(sample).ids
        assert tok.decode(ids) == sample, "round trip failed"
        print(f"validation sample: {len(sample) / len(ids):.2f} characters per token (round trip exact)")


if __name__ == "__main__":
    main()
