"""Grain pipeline: packing with EOS, shuffling, determinism, per-process shards, resume, eval."""

import json
import os

import numpy as np
import pytest

from dimba_jax.config import default_config
from dimba_jax.data.pipeline import (
    build_tokenizer_and_data,
    make_eval_batches,
    make_train_iterator,
    tokenize_documents,
)
from dimba_jax.data.sources import open_source
from dimba_jax.data.tokenizers import get_tokenizer

SEQ = 16
BYTE = get_tokenizer("byte")


def random_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    return ["".join(rng.choice(letters, size=rng.integers(5, 60))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """20 random documents in one jsonl file; returns (data_config, docs)."""
    docs = random_docs(20)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    data = default_config().data
    data.source = f"files:{tmp_path}/docs.jsonl"
    data.seq_len = SEQ
    return data, docs


def reference_stream(docs):
    """Independent reference for the packed stream: UTF-8 bytes of each document, then EOS 256."""
    out = []
    for d in docs:
        out += list(d.encode("utf-8")) + [256]
    return np.asarray(out)


def take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def ring_start(stream, window):
    """The unique start s with stream[(s + arange(len)) % N] == window."""
    n = stream.size
    starts = [s for s in range(n) if np.array_equal(stream[(s + np.arange(window.size)) % n], window)]
    assert len(starts) == 1, starts
    return starts[0]


def test_stream_packs_documents_with_eos(corpus):
    data, docs = corpus
    src = open_source(data.source, split="train")
    assert len(src) == 19  # the last document is held out for validation
    np.testing.assert_array_equal(tokenize_documents(src, BYTE, progress=False), reference_stream(docs[:19]))


def test_epochs_are_shuffled_packed_windows_covering_the_stream(corpus):
    data, docs = corpus
    stream = reference_stream(docs[:19])
    windows_per_epoch = stream.size // SEQ
    it = make_train_iterator(data, BYTE, global_batch_size=4, seed=3)
    rows = np.concatenate(take(it, (2 * windows_per_epoch) // 4 + 1))
    assert rows.dtype == np.int32 and rows.shape[1] == SEQ
    for epoch in range(2):
        ep = rows[epoch * windows_per_epoch : (epoch + 1) * windows_per_epoch]
        starts = np.array([ring_start(stream, w) for w in ep])
        # Each epoch: W windows starting at offset + j * seq_len (mod N), every j exactly once.
        expected = {j * SEQ for j in range(windows_per_epoch)}
        offsets = [o for o in starts if set(((starts - o) % stream.size).tolist()) == expected]
        assert len(offsets) == 1
        assert not np.array_equal(starts, np.sort(starts))  # shuffled, not in stream order
        if epoch == 0:
            first = starts
    assert not np.array_equal(first, starts)  # a different order (and offset) in epoch 1
    held_out = docs[19].encode()
    assert all(held_out[:12] not in bytes(r[r < 256].astype(np.uint8)) for r in rows)


def test_shapes_dtypes_and_determinism(corpus):
    data, _ = corpus
    a = take(make_train_iterator(data, BYTE, global_batch_size=6, seed=0), 5)
    b = take(make_train_iterator(data, BYTE, global_batch_size=6, seed=0), 5)
    c = take(make_train_iterator(data, BYTE, global_batch_size=6, seed=1), 5)
    for x, y in zip(a, b):
        assert x.shape == (6, SEQ) and x.dtype == np.int32
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert all(((x >= 0) & (x < BYTE.vocab_size)).all() for x in a)
    assert any((x == BYTE.eos_id).any() for x in a)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_union_is_the_global_batch(corpus, process_count):
    data, _ = corpus
    steps = 12  # crosses several epoch boundaries (the corpus has ~40 windows)
    whole = take(make_train_iterator(data, BYTE, global_batch_size=8, seed=5), steps)
    parts = [take(make_train_iterator(data, BYTE, global_batch_size=8, seed=5, process_index=p,
                                      process_count=process_count), steps) for p in range(process_count)]
    for step in range(steps):
        local = [parts[p][step] for p in range(process_count)]
        assert all(x.shape == (8 // process_count, SEQ) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), whole[step])


def test_bad_sizes_and_small_or_empty_corpora(corpus, tmp_path):
    data, _ = corpus
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        make_train_iterator(data, BYTE, global_batch_size=8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        make_train_iterator(data, BYTE, global_batch_size=8, seed=0, process_index=2, process_count=2)
    data.seq_len = 100_000
    with pytest.raises(ValueError, match="fewer than seq_len=100000"):
        make_train_iterator(data, BYTE, global_batch_size=8, seed=0)
    (tmp_path / "blank.txt").write_text("   \n")
    data.source, data.seq_len = f"files:{tmp_path}/blank.txt", SEQ
    with pytest.raises(ValueError, match="no non-empty documents"):
        make_train_iterator(data, BYTE, global_batch_size=8, seed=0)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_from_state_equals_uninterrupted(corpus, process_index, process_count):
    data, _ = corpus
    kw = dict(global_batch_size=4, seed=11, process_index=process_index, process_count=process_count)
    it = make_train_iterator(data, BYTE, **kw)
    take(it, 7)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # states must survive a JSON round trip (checkpoints)
    expected = take(it, 15)  # crosses an epoch boundary
    resumed = make_train_iterator(data, BYTE, **kw)
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 15)):
        np.testing.assert_array_equal(x, y)


def test_token_cache_is_written_and_reused(corpus, tmp_path):
    data, _ = corpus
    cache = tmp_path / "cache"
    a = take(make_train_iterator(data, BYTE, global_batch_size=4, seed=2, cache_dir=str(cache)), 4)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("tokens-") and files[0].endswith(".npy")
    b = take(make_train_iterator(data, BYTE, global_batch_size=4, seed=2, cache_dir=str(cache)), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = take(make_train_iterator(data, get_tokenizer("bpe"), global_batch_size=4, seed=2,
                                     cache_dir=str(cache)), 1)
    assert len(os.listdir(cache)) == 2 and other[0].max() < 8192  # another tokenizer, another key


def test_eval_batches_are_consecutive_heldout_windows(corpus, tmp_path):
    data, docs = corpus
    held = reference_stream(docs[19:])  # ~30 tokens: 2 x 2 x 16 = 64 wrap around the ring
    batches = make_eval_batches(data, BYTE, 2, 2, SEQ)
    again = make_eval_batches(data, BYTE, 2, 2, SEQ)
    flat = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(flat, held[np.arange(4 * SEQ) % held.size])
    for x, y in zip(batches, again):
        assert x["tokens"].shape == (2, SEQ) and x["tokens"].dtype == np.int32
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    local = make_eval_batches(data, BYTE, 2, 2, SEQ, process_index=1, process_count=2)
    np.testing.assert_array_equal(local[1]["tokens"], batches[1]["tokens"][1:])
    # A separate validation source is used whole, and training then uses every document.
    (tmp_path / "val.txt").write_text("validation text that is long enough to fill windows" * 2)
    data.val_source = f"files:{tmp_path}/val.txt"
    val = make_eval_batches(data, BYTE, 1, 1, SEQ)[0]["tokens"][0]
    assert BYTE.decode(val) == "validation text "
    assert open_source(data.source, split="all")[19] == docs[19]


def test_build_tokenizer_and_data_on_embedded_defaults():
    config = default_config()
    config.train.batch_size, config.train.eval_batches = 4, 2
    tok, it, evals = build_tokenizer_and_data(config)
    batch = next(it)["tokens"]
    assert tok.name == "byte" and batch.shape == (4, config.data.seq_len) and batch.dtype == np.int32
    text = tok.decode(batch[0])
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text)  # English prose
    assert len(evals) == 2 and evals[0]["tokens"].shape == (4, config.data.seq_len)


@pytest.mark.slow
def test_worker_process_gives_the_same_batches_and_resumes(corpus):
    data, _ = corpus
    reference = take(make_train_iterator(data, BYTE, global_batch_size=4, seed=4), 8)
    data.num_workers = 1  # one grain worker process (spawned; each costs a few seconds to start)
    it = make_train_iterator(data, BYTE, global_batch_size=4, seed=4)
    try:
        first = take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = make_train_iterator(data, BYTE, global_batch_size=4, seed=4)
    try:
        resumed.set_state(state)
        rest = take(resumed, 5)
    finally:
        resumed.close()
    for x, y in zip(first + rest, reference):
        np.testing.assert_array_equal(x, y)


def test_unigram_log_prior_counts_the_training_tokens(corpus):
    from dimba_jax.data.pipeline import open_train_source, unigram_log_prior
    data, _ = corpus
    train_docs = [open_train_source(data)[i] for i in range(len(open_train_source(data)))]
    counts = np.bincount(reference_stream(train_docs), minlength=BYTE.vocab_size) + 0.5
    got = unigram_log_prior(data, BYTE)
    assert got.shape == (BYTE.vocab_size,)
    np.testing.assert_allclose(got, np.log(counts / counts.sum()), rtol=1e-12)
