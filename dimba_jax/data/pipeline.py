"""Grain input pipelines: documents -> tokens -> packed windows -> shuffled batches.

Training (`make_train_iterator`):

  1. The source's documents (`data.source`, first `data.max_docs`) are tokenised ONCE into one
     flat token stream, each document followed by EOS: [doc0, EOS, doc1, EOS, ...] (N tokens).
     Tokenisation runs in parallel chunks with a progress bar (shown after 2 s) and, when a
     cache directory is given (`data.token_cache_dir` or `cache_dir=`), is saved as
     `tokens-<key>.npy` there and memory-mapped on later runs (key = source fingerprint, split,
     tokenizer fingerprint, max_docs). Tokens are stored as uint16 when vocab_size <= 65536
     (2 bytes/token: the 127 MB Gutenberg training set is ~70 MB of BPE tokens).
  2. The stream is read as a ring. An epoch is W = N // seq_len windows of seq_len tokens
     starting at `offset_e + j * seq_len` (mod N), j = 0..W-1, so windows are packed across
     documents and contain the EOS separators; `offset_e` is a deterministic per-epoch random
     shift (seeded by (seed, epoch)), so window boundaries differ from epoch to epoch.
  3. Window indices are globally shuffled by `grain.MapDataset.shuffle` (a fresh permutation
     every epoch, deterministic given `seed`), repeated forever and batched by the GLOBAL
     batch size B. Process p of P keeps rows [p*B/P, (p+1)*B/P) of every global batch, so the
     process-local batches stacked in process order equal the single-process batch.
  4. Each element is {"tokens": np.int32 array (B/P, seq_len)}.

The returned iterator is a `grain.DatasetIterator`: `it.get_state()` is a small JSON-able dict
and `it.set_state(state)` on a freshly built iterator (same config, seed, process index and
count) resumes with exactly the same next batches; save one state per process.

Validation (`make_eval_batches`): the validation documents (`data.val_source`, or the held-out
part of `data.source`) are tokenised in order only until enough tokens are read for
`num_batches` batches of consecutive, non-overlapping windows; if the validation text is
shorter than that the windows wrap around (the text is reused). No shuffling: deterministic.

Errors: a corpus with fewer than seq_len tokens, a global batch not divisible by the process
count, a bad process index, non-positive sizes -> ValueError naming the problem.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from typing import Any, NamedTuple

import grain
import numpy as np

from dimba_jax.data.sources import DocumentSource, limit_documents, open_source
from dimba_jax.data.tokenizers import Tokenizer, get_tokenizer

_CHUNK_CHARS = 16_000_000  # characters per encode_batch call: documents in a call are encoded in parallel


# ------------------------------------------------------------------------------ tokenisation
def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def tokenize_documents(source: DocumentSource, tokenizer: Tokenizer, *, progress: bool = True) -> np.ndarray:
    """All documents -> one flat stream [doc0, EOS, doc1, EOS, ...].

    Returns a 1-D uint16 array (int32 when vocab_size > 65536) of length sum(len_i + 1).
    Raises ValueError when the source has no documents.
    """
    n = len(source)
    if n == 0:
        raise ValueError(f"data source {source.description} has no documents")
    from tqdm.auto import tqdm

    dtype = _token_dtype(tokenizer.vocab_size)
    eos = np.asarray([tokenizer.eos_id], dtype)
    pieces: list[np.ndarray] = []
    bar = tqdm(total=n, desc=f"tokenising {source.description}", unit="doc", delay=2.0,
               disable=not progress, file=sys.stderr)
    batch: list[str] = []
    chars = 0

    def flush():
        for ids in tokenizer.encode_batch(batch):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(eos)
        bar.update(len(batch))
        batch.clear()

    for i in range(n):
        text = source[i]
        batch.append(text)
        chars += len(text)
        if chars >= _CHUNK_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    bar.close()
    return np.concatenate(pieces)


def _cache_key(source: DocumentSource, tokenizer: Tokenizer) -> str:
    tok_id = getattr(tokenizer, "fingerprint", None) or f"{tokenizer.name}-{tokenizer.vocab_size}-{tokenizer.eos_id}"
    text = f"v1|{source.fingerprint}|{source.description}|{tok_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_or_tokenize(source: DocumentSource, tokenizer: Tokenizer, *, cache_dir: str = "",
                     progress: bool = True) -> np.ndarray:
    """`tokenize_documents`, cached as `<cache_dir>/tokens-<key>.npy` when `cache_dir` is set.

    A cached array is memory-mapped read-only. Writes are atomic (several processes may race).
    """
    if not cache_dir:
        return tokenize_documents(source, tokenizer, progress=progress)
    path = os.path.join(cache_dir, f"tokens-{_cache_key(source, tokenizer)}.npy")
    if os.path.isfile(path):
        return np.load(path, mmap_mode="r")
    tokens = tokenize_documents(source, tokenizer, progress=progress)
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, tokens)
    os.replace(tmp, path)
    return tokens


# ------------------------------------------------------------------------------ windows
def _derived_seed(seed: int, salt: int) -> int:
    """A 32-bit seed derived from (seed, salt); distinct salts give independent streams."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, salt]).generate_state(1)[0])


class _WindowStart:
    """(global window index i, window id j) -> start of the window in the token ring."""

    def __init__(self, num_tokens: int, seq_len: int, windows_per_epoch: int, seed: int):
        self.num_tokens, self.seq_len, self.windows_per_epoch = num_tokens, seq_len, windows_per_epoch
        self.offset_seed = _derived_seed(seed, 1)

    def epoch_offset(self, epoch: int) -> int:
        cached = getattr(self, "_last", None)  # (epoch, offset); a tuple swap is thread-safe
        if cached is not None and cached[0] == epoch:
            return cached[1]
        offset = int(np.random.default_rng([self.offset_seed, epoch]).integers(self.num_tokens))
        self._last = (epoch, offset)
        return offset

    def __call__(self, index: int, window_id: int) -> np.int64:
        epoch = index // self.windows_per_epoch
        return np.int64((self.epoch_offset(epoch) + int(window_id) * self.seq_len) % self.num_tokens)


class _ProcessRows:
    """Global batch of starts (B,) -> this process's rows [p*b, (p+1)*b)."""

    def __init__(self, process_index: int, local_batch: int):
        self.lo, self.hi = process_index * local_batch, (process_index + 1) * local_batch

    def __call__(self, starts: np.ndarray) -> np.ndarray:
        return starts[self.lo : self.hi]


class _GatherWindows:
    """Starts (b,) -> {"tokens": int32 (b, seq_len)} read from the token ring."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.offsets = np.arange(seq_len, dtype=np.int64)

    def __call__(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        idx = (np.asarray(starts, np.int64)[:, None] + self.offsets) % self.tokens.shape[0]
        return {"tokens": np.asarray(self.tokens[idx], dtype=np.int32)}


def _check_sizes(seq_len: int, global_batch_size: int, process_index: int, process_count: int) -> int:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
        )
    return global_batch_size // process_count


def windows_dataset(tokens: np.ndarray, *, seq_len: int, global_batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """An infinite grain MapDataset of this process's batches from a flat token stream.

    tokens: 1-D integer array (the packed stream, EOS included). Element k is
    {"tokens": int32 (global_batch_size // process_count, seq_len)}: process `process_index`'s
    rows of global batch k. See the module docstring for the window and shuffle scheme.
    """
    local_batch = _check_sizes(seq_len, global_batch_size, process_index, process_count)
    tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    n = int(tokens.shape[0])
    if n < seq_len:
        raise ValueError(f"the corpus has {n} tokens, fewer than seq_len={seq_len}; use more text or a shorter seq_len")
    windows = n // seq_len
    ds = grain.MapDataset.range(windows).shuffle(seed=_derived_seed(seed, 0)).repeat(None)
    ds = ds.map_with_index(_WindowStart(n, seq_len, windows, seed))
    ds = ds.batch(global_batch_size, drop_remainder=True)
    if process_count > 1:
        ds = ds.map(_ProcessRows(process_index, local_batch))
    return ds.map(_GatherWindows(tokens, seq_len))


# ------------------------------------------------------------------------------ sources from config
def _cfg(data_config: Any, key: str, default: Any) -> Any:
    try:
        value = data_config[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def open_train_source(data_config: Any) -> DocumentSource:
    """The training documents named by `data_config` (the whole source if val_source is set)."""
    split = "all" if _cfg(data_config, "val_source", "") else "train"
    source = open_source(
        data_config.source, split=split, text_field=_cfg(data_config, "text_field", "text"),
        tfds_split=_cfg(data_config, "tfds_split", "train"),
        tfds_data_dir=_cfg(data_config, "tfds_data_dir", ""),
        heldout_fraction=_cfg(data_config, "heldout_fraction", 0.05),
    )
    return limit_documents(source, int(_cfg(data_config, "max_docs", 0)))


def unigram_log_prior(data_config: Any, tokenizer: Tokenizer, *, smoothing: float = 0.5) -> np.ndarray:
    """log p(token) of the training tokens of `data_config` (config.data), float64 (V,): counts
    plus `smoothing` each, normalised (tokenised through data.token_cache_dir when set). The
    prior of the context-free reference denoiser (DimbaTask.unigram_bound)."""
    tokens = load_or_tokenize(open_train_source(data_config), tokenizer,
                              cache_dir=_cfg(data_config, "token_cache_dir", ""), progress=False)
    counts = np.bincount(np.asarray(tokens, np.int64), minlength=tokenizer.vocab_size).astype(np.float64)
    counts = counts[:tokenizer.vocab_size] + float(smoothing)
    return np.log(counts / counts.sum())


def open_validation_source(data_config: Any) -> DocumentSource:
    """`data_config.val_source` (all of it), or else the held-out part of `data_config.source`."""
    val_spec = _cfg(data_config, "val_source", "")
    return open_source(
        val_spec or data_config.source, split="all" if val_spec else "validation",
        text_field=_cfg(data_config, "text_field", "text"),
        tfds_split=_cfg(data_config, "tfds_split", "train"),
        tfds_data_dir=_cfg(data_config, "tfds_data_dir", ""),
        heldout_fraction=_cfg(data_config, "heldout_fraction", 0.05),
    )


# ------------------------------------------------------------------------------ public API
def make_train_dataset(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1, cache_dir: str | None = None,
                       progress: bool | None = None) -> grain.IterDataset:
    """The training pipeline as a grain IterDataset (see `make_train_iterator`)."""
    local_batch = _check_sizes(int(data_config.seq_len), global_batch_size, process_index, process_count)
    del local_batch
    source = open_train_source(data_config)
    cache_dir = _cfg(data_config, "token_cache_dir", "") if cache_dir is None else cache_dir
    progress = (process_index == 0) if progress is None else progress
    tokens = load_or_tokenize(source, tokenizer, cache_dir=cache_dir, progress=progress)
    ds = windows_dataset(tokens, seq_len=int(data_config.seq_len), global_batch_size=global_batch_size,
                         seed=seed, process_index=process_index, process_count=process_count)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    workers = int(_cfg(data_config, "num_workers", 0))
    if workers > 0:
        from absl import flags  # grain's worker processes read absl flags; use defaults if unparsed

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter_ds


def make_train_iterator(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, cache_dir: str | None = None,
                        progress: bool | None = None) -> grain.DatasetIterator:
    """Infinite iterator over this process's training batches {"tokens": int32 (B/P, seq_len)}.

    data_config: the `config.data` ConfigDict (source, val_source, text_field, tfds_split,
      tfds_data_dir, heldout_fraction, seq_len, max_docs, num_workers, token_cache_dir).
    global_batch_size: B, the batch summed over all processes (B % process_count == 0).
    seed: the data seed (shuffle order and per-epoch window offsets).
    cache_dir: overrides data_config.token_cache_dir ("" = no token cache).
    progress: show the tokenisation progress bar (default: on process 0 only).
    Returns a grain DatasetIterator with get_state() / set_state() for exact resumption.
    """
    return iter(make_train_dataset(data_config, tokenizer, global_batch_size=global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count,
                                   cache_dir=cache_dir, progress=progress))


def eval_windows(source: DocumentSource, tokenizer: Tokenizer, num_windows: int, seq_len: int) -> np.ndarray:
    """The first `num_windows` consecutive windows of the source's packed token stream.

    Tokenises documents in order only until num_windows * seq_len tokens are available; a
    shorter stream is reused from its start (ring). Returns int32 (num_windows, seq_len).
    """
    need = num_windows * seq_len
    dtype = _token_dtype(tokenizer.vocab_size)
    pieces, have = [], 0
    for i in range(len(source)):
        ids = np.asarray(tokenizer.encode_batch([source[i]])[0], dtype)
        pieces += [ids, np.asarray([tokenizer.eos_id], dtype)]
        have += ids.size + 1
        if have >= need:
            break
    if have < seq_len:
        raise ValueError(f"validation data {source.description} has {have} tokens, fewer than seq_len={seq_len}")
    stream = np.concatenate(pieces)
    idx = np.arange(need, dtype=np.int64) % stream.size
    return stream[idx].astype(np.int32).reshape(num_windows, seq_len)


def make_eval_batches(data_config: Any, tokenizer: Tokenizer, batch_size: int, num_batches: int, seq_len: int,
                      *, process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Deterministic validation batches: a list of `num_batches` dicts {"tokens": int32 (b, seq_len)}.

    batch_size is the global batch; with several processes each gets rows
    [p*b, (p+1)*b), b = batch_size // process_count, of every batch (as in training).
    """
    local = _check_sizes(seq_len, batch_size, process_index, process_count)
    if num_batches <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    windows = eval_windows(open_validation_source(data_config), tokenizer, batch_size * num_batches, seq_len)
    windows = windows.reshape(num_batches, batch_size, seq_len)[:, process_index * local : (process_index + 1) * local]
    return [{"tokens": np.ascontiguousarray(w)} for w in windows]


class DataBundle(NamedTuple):
    """What the trainer needs from the data package."""

    tokenizer: Tokenizer
    train_iterator: grain.DatasetIterator  # yields {"tokens": int32 (B/P, seq_len)}
    eval_batches: list[dict[str, np.ndarray]]  # config.train.eval_batches x {"tokens": int32 (B/P, seq_len)}


def build_tokenizer_and_data(config: Any, *, process_index: int = 0, process_count: int = 1,
                             cache_dir: str | None = None) -> DataBundle:
    """Tokenizer (config.data.tokenizer), training iterator and validation batches from a full config.

    Uses config.data.*, config.train.batch_size (global), config.train.eval_batches and
    config.seed (the data seed).
    """
    tokenizer = get_tokenizer(config.data.tokenizer)
    batch = int(config.train.batch_size)
    train_it = make_train_iterator(config.data, tokenizer, global_batch_size=batch, seed=int(config.seed),
                                   process_index=process_index, process_count=process_count, cache_dir=cache_dir)
    evals = make_eval_batches(config.data, tokenizer, batch, max(1, int(config.train.eval_batches)),
                              int(config.data.seq_len), process_index=process_index, process_count=process_count)
    return DataBundle(tokenizer, train_it, evals)
