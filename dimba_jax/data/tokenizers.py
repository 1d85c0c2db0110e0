"""Tokenizers with one small interface: text <-> integer token ids.

Every tokenizer has

    name: str            "byte", "bpe" or "bpe_2048" (a short, stable identifier)
    vocab_size: int      ids are in [0, vocab_size); the model's embedding has this many rows
    eos_id: int          the end-of-sequence / document separator id (the pipeline inserts it)
    fingerprint: str     changes whenever the id mapping changes (used to key token caches)
    encode(text) -> list[int]                   no EOS is added
    encode_batch(texts) -> list[np.ndarray]     one int32 array (n_tokens,) per text; faster
    decode(ids) -> str                          EOS and out-of-range ids are dropped; nothing
                                                is cut at EOS (callers cut at the first EOS)

`get_tokenizer(name)`:
  * "byte": ids 0..255 are the UTF-8 bytes of the text, 256 is EOS; vocab_size 257. Needs no
    files. Decoding drops ids >= 256 and replaces invalid UTF-8 with U+FFFD.
  * "bpe": a byte-level BPE (8192 ids, "<|endoftext|>" = EOS) trained once on a sample of the
    Gutenberg training books by `scripts/train_bpe.py` and shipped in the package as
    `dimba_jax/data/assets/bpe_8192.json`. Byte-level, so every string round-trips exactly.
  * "bpe_2048": the same recipe with 2048 ids (`dimba_jax/data/assets/bpe_2048.json`): 2.57
    characters per token on the validation books instead of 2.97, but a quarter of the
    embedding rows, so the tied head and the output prior cost a quarter (configs/tiny.py on
    2 CPU cores: 83 ms per step of 6 x 64 tokens instead of 194).
  * "bpe:PATH": any `tokenizers` json file with an "<|endoftext|>" special token.
The special-token text "<|endoftext|>" inside a document is encoded as ordinary text, never as
EOS: only the pipeline places EOS ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

EOS_TOKEN = "<|endoftext|>"  # The special token of the BPE vocabulary that serves as EOS.
DEFAULT_BPE_ASSET = "bpe_8192.json"  # File under dimba_jax/data/assets/ used by "bpe".
PACKAGED_BPE = {"bpe": DEFAULT_BPE_ASSET, "bpe_2048": "bpe_2048.json"}  # name -> file under assets/
VALID_NAMES = ("byte", *PACKAGED_BPE, "bpe:PATH")


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every tokenizer of this package implements (see the module docstring)."""

    name: str
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_array(ids: Iterable[int]) -> np.ndarray:
    """Any iterable / array of ids -> a flat int64 numpy array (scalars become length 1)."""
    arr = np.asarray(ids if not isinstance(ids, (list, tuple)) else list(ids))
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS (vocab_size 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-utf8-eos256"

    def encode(self, text: str) -> list[int]:
        """str -> list of byte values (ints in [0, 256)); no EOS appended."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """list of str -> list of int32 arrays (n_bytes_i,) of UTF-8 byte values."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """ids (any int iterable / array) -> str; ids outside [0, 256) (EOS) are dropped."""
        arr = _as_int_array(ids)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class BPETokenizer:
    """A byte-level BPE from a `tokenizers` json file with an "<|endoftext|>" special token."""

    def __init__(self, json_text: str, *, source: str = "<memory>", name: str = "bpe"):
        from tokenizers import Tokenizer as HFTokenizer  # the `tokenizers` library

        self._tok = HFTokenizer.from_str(json_text)
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"BPE tokenizer {source} has no {EOS_TOKEN!r} special token")
        # Special-token text inside documents is encoded as plain text; EOS comes only from us.
        self._tok.encode_special_tokens = True
        self.eos_id = int(eos)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.source = source
        self.name = name
        self.fingerprint = "bpe-" + hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Loads a tokenizer json file; FileNotFoundError if it does not exist."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BPE tokenizer file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), source=path)

    def encode(self, text: str) -> list[int]:
        """str -> list of BPE ids; no EOS appended."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """list of str -> list of int32 id arrays; encodes in parallel (Rust threads)."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> str; EOS and ids outside [0, vocab_size) are dropped."""
        arr = _as_int_array(ids)
        arr = arr[(arr >= 0) & (arr < self.vocab_size) & (arr != self.eos_id)]
        return self._tok.decode(arr.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, source={self.source!r})"


@functools.lru_cache(maxsize=None)
def _packaged_bpe(name: str) -> BPETokenizer:
    filename = PACKAGED_BPE[name]
    asset = importlib.resources.files("dimba_jax.data").joinpath("assets", filename)
    if not asset.is_file():
        raise FileNotFoundError(
            f"the packaged BPE vocabulary dimba_jax/data/assets/{filename} is missing; "
            "rebuild it with scripts/train_bpe.py"
        )
    return BPETokenizer(asset.read_text(encoding="utf-8"), source=f"package:{filename}", name=name)


def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer called `name`: "byte", "bpe" / "bpe_2048" (packaged BPEs) or "bpe:PATH".

    Raises ValueError for an unknown name (listing the valid ones) and FileNotFoundError for a
    missing "bpe:PATH" file.
    """
    if name == "byte":
        return ByteTokenizer()
    if name in PACKAGED_BPE:
        return _packaged_bpe(name)
    if isinstance(name, str) and name.startswith("bpe:") and len(name) > 4:
        return BPETokenizer.from_file(name[4:])
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(VALID_NAMES)}")
