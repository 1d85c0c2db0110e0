"""Judge perplexity: how likely a held-fixed causal LM (the judge) finds a set of texts.

The judge is an autoregressive Mamba-2 LM (``dimba_jax.models.ar.MambaLM``) trained on the shared
corpus (``configs/judge.py``) and used only to score text. Scoring a text:

1. tokenize it with the judge's tokenizer and prepend the EOS id (the trainer packs documents
   separated by EOS, so "after EOS" is "start of a document");
2. cut the token sequence into fixed windows of ``window`` input tokens (window k feeds tokens
   ``[k*stride, k*stride + window)`` and predicts the next token at each position; with the
   default ``stride = window`` windows do not overlap and each starts without earlier context;
   a smaller stride gives later windows ``window - stride`` tokens of context, each target still
   scored exactly once);
3. sum ``-log p(target)`` over the scored targets of all texts and divide by their number:
   the mean NLL per judge token (nats); ``ppl = exp(mean NLL)``.

With a context (the prompt of a prompted sample) the context's tokens are fed but not scored:
the judge rates the continuation given its prompt. All windows are padded to one shape and run
in fixed-size batches, so scoring compiles once per (window, batch) and never again.

``reference_stats`` gives the same numbers for real held-out text cut to the samples' length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.evaluate import metrics

LogitsFn = Callable[[jax.Array], jax.Array]


# --------------------------------------------------------------------- tokenizer access
def tokenizer_encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` (no special tokens added) with a dimba_jax or HF-style tokenizer."""
    ids = tokenizer.encode(text)
    if hasattr(ids, "ids"):  # tokenizers.Encoding
        ids = ids.ids
    return [int(i) for i in ids]


def tokenizer_eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id (attribute `eos_id`, `eos_token_id` or `eos`)."""
    for name in ("eos_id", "eos_token_id", "eos"):
        value = getattr(tokenizer, name, None)
        if value is not None and not callable(value):
            return int(value)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} exposes no eos id (eos_id)")


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """The tokenizer's vocabulary size (attribute or method `vocab_size`)."""
    value = getattr(tokenizer, "vocab_size", None)
    if callable(value):
        value = value()
    if value is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} exposes no vocab_size")
    return int(value)


# --------------------------------------------------------------------- windowing
def make_windows(sequences: Sequence[Sequence[int]], score_from: Sequence[int], window: int,
                 stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts token sequences into fixed scoring windows.

    Args:
      sequences: per text, its token ids including the leading start (EOS) token.
      score_from: per text, the first index in the sequence whose token is scored (>= 1):
        tokens before it are context only.
      window: input tokens per window.
      stride: step between window starts (default `window`: no overlap); 1 <= stride <= window.
    Returns:
      inputs int32 (n_windows, window), targets int32 (n_windows, window),
      mask float32 (n_windows, window): 1 where targets[i, j] is scored. Every scored target of
      every text appears exactly once.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if len(sequences) != len(score_from):
        raise ValueError("sequences and score_from differ in length")
    inputs, targets, masks = [], [], []
    for seq, first in zip(sequences, score_from):
        seq = np.asarray(seq, np.int32)
        n = len(seq)
        first = max(int(first), 1)
        next_unscored = first  # smallest target index not yet scored
        start = 0
        while next_unscored < n:
            inp = seq[start:start + window]
            tgt = seq[start + 1:start + 1 + window]
            k = len(tgt)
            target_index = np.arange(start + 1, start + 1 + k)
            m = (target_index >= next_unscored).astype(np.float32)
            row_in = np.zeros(window, np.int32)
            row_t = np.zeros(window, np.int32)
            row_m = np.zeros(window, np.float32)
            row_in[:len(inp)] = inp
            row_t[:k] = tgt
            row_m[:k] = m
            if m.any():
                inputs.append(row_in)
                targets.append(row_t)
                masks.append(row_m)
            next_unscored = max(next_unscored, start + 1 + k)
            start += stride
    if not inputs:
        z = np.zeros((0, window), np.int32)
        return z, z.copy(), np.zeros((0, window), np.float32)
    return np.stack(inputs), np.stack(targets), np.stack(masks)


def _nll_sum_fn(model_or_fn: nnx.Module | LogitsFn, vocab_size: int) -> Callable[..., jax.Array]:
    """A jitted (inputs, targets, mask) -> (sum of masked NLL, float32 scalar) for one batch.

    Logit columns >= vocab_size (a padded vocabulary) are excluded from the softmax.
    """

    def nll(logits, targets, mask):
        logits = logits.astype(jnp.float32)
        if logits.shape[-1] > vocab_size:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return -(picked * mask).sum()

    if isinstance(model_or_fn, nnx.Module):
        graphdef, state = nnx.split(model_or_fn)

        @jax.jit
        def fn_state(state, inputs, targets, mask):
            model = nnx.merge(graphdef, state)
            return nll(model(inputs), targets, mask)

        return lambda inputs, targets, mask: fn_state(state, inputs, targets, mask)

    logits_fn = model_or_fn

    @jax.jit
    def fn(inputs, targets, mask):
        return nll(logits_fn(inputs), targets, mask)

    return fn


class Judge:
    """Scores texts under a causal LM.

    Args:
      model: an ``nnx.Module`` with ``__call__(ids int32 (b, n)) -> logits (b, n, V >= vocab)``
        (``MambaLM``; padded vocabulary columns are masked out) or any such function.
      tokenizer: the judge's tokenizer (``encode``, ``decode``, ``eos_id``).
      window: input tokens per scoring window.
      batch_size: windows per forward call (the last batch is padded with masked rows).
      stride: window step (default = window, no overlap).
    """

    def __init__(self, model: nnx.Module | LogitsFn, tokenizer: Any, *, window: int = 512,
                 batch_size: int = 16, stride: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.eos_id = tokenizer_eos_id(tokenizer)
        self.vocab_size = tokenizer_vocab_size(tokenizer)
        self._nll_sum = _nll_sum_fn(model, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Judge token ids of `text` (no special tokens)."""
        return tokenizer_encode(self.tokenizer, text)

    def score_ids(self, sequences: Sequence[Sequence[int]],
                  contexts: Sequence[Sequence[int]] | None = None) -> dict:
        """Mean NLL/token of judge-token sequences (each given its optional context ids).

        Returns {"nll": mean nats per scored token, "ppl": exp(nll), "tokens": scored count};
        nll and ppl are nan when nothing is scored (all texts empty).
        """
        contexts = contexts if contexts is not None else [[] for _ in sequences]
        if len(contexts) != len(sequences):
            raise ValueError(f"{len(sequences)} texts but {len(contexts)} contexts")
        full, first = [], []
        for seq, ctx in zip(sequences, contexts):
            full.append([self.eos_id, *ctx, *seq])
            first.append(1 + len(ctx))
        inputs, targets, mask = make_windows(full, first, self.window, self.stride)
        count = float(mask.sum())
        if count == 0:
            return {"nll": float("nan"), "ppl": float("nan"), "tokens": 0}
        total = 0.0
        bs = self.batch_size
        for i in range(0, len(inputs), bs):
            chunk = [a[i:i + bs] for a in (inputs, targets, mask)]
            pad = bs - len(chunk[0])
            if pad:
                chunk = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in chunk]
            total += float(self._nll_sum(*(jnp.asarray(a) for a in chunk)))
        nll = total / count
        return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": int(count)}

    def score_texts(self, texts: Sequence[str], contexts: Sequence[str] | None = None) -> dict:
        """Judge NLL/ppl of `texts` (each given its optional prompt text), plus entropies.

        Returns score_ids's dict plus metrics.entropy_report's keys (entropy over the judge's
        tokens of each text, word entropy, mean tokens).
        """
        seqs = [self.encode(t) for t in texts]
        ctx = None if contexts is None else [self.encode(c) for c in contexts]
        out = self.score_ids(seqs, ctx)
        out.update(metrics.entropy_report(seqs, list(texts)))
        return out


    def prompt_fit(self, texts: Sequence[str], contexts: Sequence[str], head_tokens: int = 32) -> dict:
        """Whether continuations belong to their own prompts: the judge perplexity of the first
        `head_tokens` judge tokens of each text given its own prompt (fit_ppl_own) and given the
        next text's prompt, one it was not written after (fit_ppl_other; the prompts rotated by
        one). A generator that reads its prompt scores own < other. Needs two or more texts.
        Returns {"fit_ppl_own", "fit_ppl_other", "fit_tokens"} (floats, int)."""
        if len(texts) < 2 or len(contexts) != len(texts):
            raise ValueError(f"prompt_fit needs two or more texts with one prompt each, got "
                             f"{len(texts)} texts and {len(contexts)} prompts")
        heads = [self.encode(t)[:head_tokens] for t in texts]
        ctx = [self.encode(c) for c in contexts]
        own = self.score_ids(heads, ctx)["ppl"]
        other = self.score_ids(heads, ctx[1:] + ctx[:1])["ppl"]
        return {"fit_ppl_own": float(own), "fit_ppl_other": float(other), "fit_tokens": int(head_tokens)}


def real_token_chunks(texts: Sequence[str], tokenizer: Any, num: int, length: int,
                      skip_tokens: int = 0) -> list[list[int]]:
    """`num` real-text excerpts of `length` token ids each, spread evenly over `texts`.

    Each text is tokenized and its first `skip_tokens` dropped (licence headers); every text
    long enough gives up to ``ceil(num / n_texts)`` excerpts at evenly spaced, non-overlapping
    offsets, taken round-robin over texts until `num` are collected. Deterministic.
    Raises ValueError if the texts hold fewer than `num` such excerpts.
    """
    if num < 1 or length < 1:
        raise ValueError(f"num and length must be >= 1, got {num}, {length}")
    books = []
    if hasattr(tokenizer, "encode_batch"):  # parallel (dimba_jax tokenizers)
        encoded = [list(map(int, a)) for a in tokenizer.encode_batch(list(texts))]
    else:
        encoded = [tokenizer_encode(tokenizer, t) for t in texts]
    for ids in encoded:
        ids = ids[skip_tokens:]
        if len(ids) >= length:
            books.append(ids)
    if not books:
        raise ValueError(f"no text holds {length} tokens (after skipping {skip_tokens})")
    per_book = -(-num // len(books))
    offsets = []
    for ids in books:
        k = min(per_book, len(ids) // length)  # at most the non-overlapping excerpts available
        span = len(ids) - length
        # evenly spaced; consecutive offsets are >= length apart because k <= len // length
        offsets.append([0] if k == 1 else [round(i * span / (k - 1)) for i in range(k)])
    chunks = []
    for j in range(per_book):
        for ids, offs in zip(books, offsets):
            if j < len(offs) and len(chunks) < num:
                chunks.append(list(ids[offs[j]:offs[j] + length]))
    if len(chunks) < num:
        raise ValueError(f"texts hold only {len(chunks)} excerpts of {length} tokens, need {num}")
    return chunks


def real_text_chunks(texts: Sequence[str], tokenizer: Any, num: int, length: int,
                     skip_tokens: int = 0) -> list[str]:
    """`real_token_chunks` decoded back to strings."""
    return [tokenizer.decode(c) for c in real_token_chunks(texts, tokenizer, num, length, skip_tokens)]


def reference_stats(judge: Judge, texts: Sequence[str], num: int, length: int,
                    skip_tokens: int = 0) -> dict:
    """Judge ppl and entropies of `num` real excerpts of `length` judge tokens (the reference)."""
    chunks = real_text_chunks(texts, judge.tokenizer, num, length, skip_tokens)
    return judge.score_texts(chunks)


def reference_prompted_stats(judge: Judge, texts: Sequence[str], num: int, prompt_len: int,
                             length: int, skip_tokens: int = 0) -> dict:
    """What a prompt is worth on real text: judge perplexity of `num` real continuations of
    `length` judge tokens given the `prompt_len` tokens before them in their book
    (ppl_prompted) and given nothing (ppl_unprompted), and ratio = prompted / unprompted (the
    real-text counterpart of the prompted-over-unprompted ratio of generated samples)."""
    chunks = real_token_chunks(texts, judge.tokenizer, num, prompt_len + length, skip_tokens)
    conts = [c[prompt_len:] for c in chunks]
    prompted = judge.score_ids(conts, [c[:prompt_len] for c in chunks])["ppl"]
    unprompted = judge.score_ids(conts)["ppl"]
    return {"ppl_prompted": float(prompted), "ppl_unprompted": float(unprompted),
            "ratio": float(prompted / unprompted), "prompt_len": int(prompt_len), "num": int(num)}
