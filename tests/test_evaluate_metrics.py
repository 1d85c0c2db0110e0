"""Evaluation package: entropy, judge perplexity, windows, timing, slope fit, results schema."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimba_jax.data.tokenizers import get_tokenizer
from dimba_jax.evaluate import judge as judge_lib
from dimba_jax.evaluate import long_context, metrics, results, timing


# ----------------------------------------------------------------------------- entropy
def test_unigram_entropy_matches_hand_computation():
    # counts a:2 b:1 c:1 -> p = 1/2, 1/4, 1/4 -> H = 0.5*1 + 2 * 0.25*2 = 1.5 bits
    assert metrics.unigram_entropy_bits("abac") == pytest.approx(1.5)
    assert metrics.unigram_entropy_bits([7, 7, 7]) == 0.0
    assert metrics.unigram_entropy_bits([]) == 0.0
    assert metrics.unigram_entropy_bits(range(8)) == pytest.approx(3.0)


def test_mean_and_pooled_entropy():
    seqs = [[1, 1], [1, 2], []]
    # per-sample: 0 and 1 bit; empty skipped -> mean 0.5 ; pooled counts {1:3, 2:1}
    assert metrics.mean_entropy(seqs) == pytest.approx(0.5)
    pooled = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert metrics.pooled_entropy(seqs) == pytest.approx(pooled)
    assert math.isnan(metrics.mean_entropy([[]]))


def test_word_entropy_uses_lowercased_words_and_punctuation():
    assert metrics.words("The cat, the CAT.") == ["the", "cat", ",", "the", "cat", "."]
    rep = metrics.entropy_report([[1, 2], [3, 3]], ["a b", "c c"])
    assert rep["entropy"] == pytest.approx(0.5)
    assert rep["entropy_words"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.entropy_report([[1]], [])


# ----------------------------------------------------------------------------- judge
def test_make_windows_scores_every_target_once():
    seqs = [list(range(1, 12)), [5, 6, 7]]  # 10 targets and 2 targets
    first = [1, 2]  # second text: token at index 1 is context only
    for stride in (4, 2, 1):
        inp, tgt, mask = judge_lib.make_windows(seqs, first, window=4, stride=stride)
        scored = sorted(int(t) for t, m in zip(tgt.ravel(), mask.ravel()) if m)
        assert scored == sorted(list(range(2, 12)) + [7])
        # inputs are the shifted targets
        sel = mask[:, 1:] > 0
        assert (inp[:, 1:][sel] == tgt[:, :-1][sel]).all()


def test_judge_uniform_logits_perplexity_is_vocab_size():
    tok = get_tokenizer("byte")
    vocab = tok.vocab_size

    def uniform(ids):
        return jnp.zeros(ids.shape + (vocab,), jnp.float32)

    judge = judge_lib.Judge(uniform, tok, window=8, batch_size=3)
    out = judge.score_texts(["hello world, this is a test", "ab"], contexts=["ctx", ""])
    assert out["ppl"] == pytest.approx(vocab, rel=1e-4)
    assert out["tokens"] == len("hello world, this is a test") + 2
    assert out["nll"] == pytest.approx(math.log(vocab), rel=1e-5)


def test_judge_scores_against_independent_loop():
    """A bigram-table 'model': judge NLL equals a direct Python sum over targets."""
    tok = get_tokenizer("byte")
    vocab = tok.vocab_size
    table = jax.random.normal(jax.random.PRNGKey(0), (vocab, vocab))

    def bigram(ids):
        return table[ids]

    text, ctx = "the quick brown fox", "once "
    judge = judge_lib.Judge(bigram, tok, window=5, batch_size=2)
    out = judge.score_texts([text], contexts=[ctx])
    seq = [tok.eos_id] + tok.encode(ctx) + tok.encode(text)
    logp = jax.nn.log_softmax(table, axis=-1)
    # window-restart: the first input of every window is still the true previous token for a
    # bigram model, so windowing changes nothing here.
    expected = -np.mean([float(logp[seq[i - 1], seq[i]]) for i in range(1 + len(ctx), len(seq))])
    assert out["nll"] == pytest.approx(expected, rel=1e-5)


def test_prompt_fit_scores_each_head_after_its_own_and_anothers_prompt():
    """A judge that expects each byte to repeat the previous one: continuations that repeat their
    own prompt's last byte fit it (own ppl far below other); only the first head_tokens count."""
    tok = get_tokenizer("byte")
    vocab = tok.vocab_size
    table = jnp.where(jnp.eye(vocab, dtype=bool), 8.0, 0.0)

    judge = judge_lib.Judge(lambda ids: table[ids], tok, window=16, batch_size=2)
    out = judge.prompt_fit(["aaaaZZZZ", "bbbbZZZZ", "ccccZZZZ"], ["xa", "xb", "xc"], head_tokens=4)
    assert out["fit_tokens"] == 4
    p_same = float(jax.nn.softmax(table[0])[0])  # a repeat
    assert out["fit_ppl_own"] == pytest.approx(1.0 / p_same, rel=1e-4)
    # after another prompt the first byte is not a repeat; the next three are
    p_other = float(jax.nn.softmax(table[0])[1])
    assert out["fit_ppl_other"] == pytest.approx(math.exp(-(math.log(p_other) + 3 * math.log(p_same)) / 4), rel=1e-4)
    with pytest.raises(ValueError, match="two or more"):
        judge.prompt_fit(["a"], ["b"])


def test_reference_prompted_stats_scores_real_continuations_with_and_without_their_prompt():
    """Books of one repeated letter under a judge that expects repeats: after its prompt every
    continuation byte is a repeat; without it the first byte follows EOS."""
    tok = get_tokenizer("byte")
    vocab = tok.vocab_size
    table = jnp.where(jnp.eye(vocab, dtype=bool), 8.0, 0.0)
    judge = judge_lib.Judge(lambda ids: table[ids], tok, window=16, batch_size=2)
    out = judge_lib.reference_prompted_stats(judge, [c * 40 for c in "abc"], num=3, prompt_len=4,
                                             length=6)
    p_same = float(jax.nn.softmax(table[0])[0])
    p_first = float(jax.nn.softmax(table[tok.eos_id])[ord("a")])
    assert out["ppl_prompted"] == pytest.approx(1.0 / p_same, rel=1e-4)
    assert out["ppl_unprompted"] == pytest.approx(
        math.exp(-(math.log(p_first) + 5 * math.log(p_same)) / 6), rel=1e-4)
    assert out["ratio"] == pytest.approx(out["ppl_prompted"] / out["ppl_unprompted"])
    assert (out["prompt_len"], out["num"]) == (4, 3)


def test_real_token_chunks_are_distinct_real_excerpts():
    tok = get_tokenizer("byte")
    books = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(100)) for i in range(3)]
    chunks = judge_lib.real_token_chunks(books, tok, num=6, length=20, skip_tokens=10)
    assert len(chunks) == 6 and all(len(c) == 20 for c in chunks)
    for c in chunks:
        assert any(tok.decode(c) in b for b in books)
    with pytest.raises(ValueError):
        judge_lib.real_token_chunks(books, tok, num=100, length=20)


# ----------------------------------------------------------------------------- timing
def test_time_call_excludes_compile():
    calls = []

    def fn(x):
        if not calls:
            time.sleep(0.3)  # the 'compile' of the first call
        calls.append(1)
        return x + 1

    t = timing.time_call(fn, jnp.ones(3), repeats=3)
    assert len(calls) == 4
    assert t.compile_s >= 0.3
    assert t.median_ms < 100
    assert len(t.times_ms) == 3


def test_time_call_jitted_median_and_memory_helpers():
    f = jax.jit(lambda x: (x @ x).sum())
    x = jnp.ones((64, 64))
    t = timing.time_call(f, x, repeats=3)
    assert float(t.result) == 64.0 ** 3
    assert t.median_ms == sorted(t.times_ms)[1]
    mem = timing.compiled_memory_bytes(f.lower(x).compile())
    assert mem is None or mem >= 64 * 64 * 4
    assert timing.gib(2 ** 30) == 1.0
    with pytest.raises(ValueError):
        timing.time_call(f, x, repeats=0)


# ----------------------------------------------------------------------------- slope
def test_loglog_slope_recovers_exponent():
    L = np.array([1024, 4096, 16384, 65536])
    assert long_context.fit_loglog_slope(L, 3e-3 * L ** 1.0) == pytest.approx(1.0)
    assert long_context.fit_loglog_slope(L, 2e-6 * L ** 2.0) == pytest.approx(2.0)
    noisy = 1e-3 * L ** 1.1 * np.array([1.02, 0.97, 1.01, 0.99])
    assert abs(long_context.fit_loglog_slope(L, noisy) - 1.1) < 0.03
    with pytest.raises(ValueError):
        long_context.fit_loglog_slope([1024, 1024], [1.0, 2.0])
    with pytest.raises(ValueError):
        long_context.fit_loglog_slope([1, 2], [0.0, 1.0])


def test_measure_scaling_on_a_linear_op():
    def make_step(L):
        f = jax.jit(lambda x: jnp.cumsum(x * 2.0))
        return f, (jnp.ones((L,)),)

    rows = long_context.measure_scaling(make_step, [256, 64], repeats=2)
    assert [r["L"] for r in rows] == [64, 256]
    assert all(r["step_ms"] > 0 for r in rows)


# ----------------------------------------------------------------------------- results
def test_results_merge_replaces_same_identity(tmp_path):
    row = {"model": "ar", "sampler": "ar", "steps": 8, "L_gen": 8, "batch": 1, "prompted": False,
           "latency_ms": 1.0, "tokens_per_s": 8000.0, "judge_ppl": 3.0, "entropy": 2.0}
    res = results.empty_results("cpu", "cmd")
    results.merge_rows(res, [row, dict(row, batch=2)])
    results.merge_rows(res, [dict(row, latency_ms=2.0)])
    assert len(res["rows"]) == 2 and res["rows"][0]["latency_ms"] == 2.0
    results.merge_long_context(res, [{"L": 64, "step_ms": 1.0, "peak_gib": None}])
    path = str(tmp_path / "r.json")
    results.save(res, path)
    back = results.load(path)
    results.validate(back)
    assert back["rows"] == res["rows"]
    with pytest.raises(ValueError):
        results.merge_rows(res, [dict(row, model="gpt")])
    with pytest.raises(ValueError):
        results.merge_rows(res, [dict(row, extra=1)])
