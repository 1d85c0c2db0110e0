"""Diversity metrics of a sample set: unigram entropy over tokens and over words.

Definitions (used everywhere in the evaluation package and in ``pareto_h200.json``):

* **Token unigram entropy of one text** (bits/token): tokenize the text with the judge's
  tokenizer (no EOS/BOS added), count each token id, ``H = -sum_i p_i log2 p_i`` with
  ``p_i = count_i / n``. A text that repeats one token has H = 0; ``n`` distinct tokens give
  ``log2 n``. The bound ``log2 n`` means the value depends on the text's length, so samples and
  real text are always compared at the same token length.
* **Sample-set entropy** (the ``"entropy"`` column): the mean over samples of the per-text token
  entropy (the convention of diffusion-LM papers such as MDLM, which report the mean per-sample
  unigram entropy to catch repetitive, degenerate text). Empty texts are skipped.
* **Pooled entropy**: the entropy of the pooled token counts of all texts together (grows with
  the number of samples; reported as an extra).
* **Word entropy**: the same per-text mean over lower-cased words, a word being a maximal run
  of letters/digits/apostrophes or a single punctuation character (tokenizer independent).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Sequence

_WORD_RE = re.compile(r"[\w']+|[^\w\s]")


def unigram_entropy_bits(items: Iterable) -> float:
    """Entropy in bits of the empirical unigram distribution of `items` (any hashables).

    Returns 0.0 for an empty iterable (no information) and for a single repeated item.
    """
    counts = collections.Counter(items)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    h = 0.0
    for c in counts.values():
        p = c / total
        h -= p * math.log2(p)
    return h


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of `text` (see the module docstring)."""
    return _WORD_RE.findall(text.lower())


def mean_entropy(sequences: Sequence[Sequence]) -> float:
    """Mean per-sequence unigram entropy (bits) over the non-empty sequences; nan if none."""
    values = [unigram_entropy_bits(s) for s in sequences if len(s) > 0]
    if not values:
        return float("nan")
    return float(sum(values) / len(values))


def pooled_entropy(sequences: Sequence[Sequence]) -> float:
    """Unigram entropy (bits) of all sequences' items counted together; nan if all empty."""
    if not any(len(s) for s in sequences):
        return float("nan")
    return unigram_entropy_bits(item for s in sequences for item in s)


def entropy_report(token_sequences: Sequence[Sequence[int]], texts: Sequence[str]) -> dict:
    """All diversity numbers of one sample set.

    Args:
      token_sequences: per sample, its token ids under the judge's tokenizer (list of ints).
      texts: the same samples as strings (for word entropy).
    Returns:
      {"entropy": mean per-sample token entropy, "entropy_pooled": pooled token entropy,
       "entropy_words": mean per-sample word entropy, "mean_tokens": mean tokens per sample}
    """
    if len(token_sequences) != len(texts):
        raise ValueError(f"{len(token_sequences)} token sequences but {len(texts)} texts")
    n = len(texts)
    return {
        "entropy": mean_entropy(token_sequences),
        "entropy_pooled": pooled_entropy(token_sequences),
        "entropy_words": mean_entropy([words(t) for t in texts]),
        "mean_tokens": float(sum(len(s) for s in token_sequences) / n) if n else float("nan"),
    }
