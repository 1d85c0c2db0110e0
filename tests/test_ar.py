"""The causal Mamba-2 LM baseline: recurrent step, generation and its Task (CPU, tiny).

One layer keeps compilation short; the 2-layer structure (residual stream, per-layer caches) is
checked against mamba_ssm in test_golden.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _nnx_jit import jitted, run_steps
from dimba_jax.config import default_config
from dimba_jax.models import ar
from dimba_jax.models.ar import MambaLM, generate, sample_logits
from dimba_jax.tasks.ar import ArTask

VOCAB = 50  # padded to 64
SIZES = dict(d_model=32, n_layers=1, d_state=8, expand=2, headdim=8, ngroups=2, d_conv=4,
             chunk_size=4, ssd_impl="reference")  # cheapest to compile; xla: test_golden
TOL = dict(rtol=1e-4, atol=1e-4)


def _model(seed=0, **kw):
    return MambaLM(VOCAB, rngs=nnx.Rngs(seed), **dict(SIZES, **kw))


def _ids(seed=0, shape=(2, 10)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def test_step_and_prefill_equal_parallel_forward():
    model, ids = _model(), _ids()
    logits = jitted(model)(ids)
    assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
    step_logits, cache_steps = run_steps(model, ids[:, :5], model.init_cache(2))
    np.testing.assert_allclose(step_logits, logits[:, :5], **TOL)
    pre_logits, cache_pre = jitted(model, "prefill")(ids[:, :5])
    np.testing.assert_allclose(pre_logits, logits[:, :5], **TOL)
    for a, b in zip(jax.tree.leaves(cache_pre), jax.tree.leaves(cache_steps)):
        np.testing.assert_allclose(a, b, **TOL)
    rest, _ = run_steps(model, ids[:, 5:], cache_pre)
    np.testing.assert_allclose(rest, logits[:, 5:], **TOL)


def test_untied_head_and_bf16_compute():
    model = _model(tie_embeddings=False, dtype=jnp.bfloat16)
    assert model.lm_head is not None
    logits = jitted(model)(_ids())
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_greedy_generation_is_argmax_of_parallel_forward():
    model, prompt = _model(), _ids(1, (2, 4))
    new = generate(model, prompt, 6, jax.random.key(0), temperature=0.0)
    assert new.shape == (2, 6) and new.dtype == jnp.int32
    full = jnp.concatenate([prompt, new], axis=1)  # (2, 10)
    logits = jitted(model)(full)[..., :VOCAB]
    np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(logits[:, 3:9], -1)))
    # a vanishing nucleus keeps only the most likely token: sampling becomes greedy
    tiny_p = generate(model, prompt, 6, jax.random.key(5), temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(new))
    # padding rows of the vocabulary are never produced, even when they score highest
    emb = model.embedding.embedding
    emb[...] = emb[...].at[VOCAB:].set(10.0 * emb[...][:1].repeat(64 - VOCAB, 0))
    assert bool(jnp.any(jnp.argmax(jitted(model)(full), -1) >= VOCAB))
    for temperature in (0.0, 1.0):
        out = generate(model, prompt, 6, jax.random.key(1), temperature=temperature)
        assert int(out.max()) < VOCAB


def test_sampling_is_deterministic_given_the_key():
    model, prompt = _model(), _ids(2, (2, 4))
    a = generate(model, prompt, 6, jax.random.key(7), temperature=1.0, top_p=0.9)
    b = generate(model, prompt, 6, jax.random.key(7), temperature=1.0, top_p=0.9)
    c = generate(model, prompt, 6, jax.random.key(8), temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_top_p_restricts_support_and_renormalises():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None].repeat(4096, 0)  # 4096 independent rows
    draw = jax.jit(sample_logits, static_argnames="vocab_size")

    def counts(top_p, temperature=1.0):
        ids = np.asarray(draw(logits, jax.random.key(0), temperature, top_p))
        return np.bincount(ids, minlength=4) / ids.size

    nucleus = counts(0.7)  # 0.5 + 0.3 reaches 0.7: only tokens 0 and 1
    assert nucleus[2] == 0 and nucleus[3] == 0
    assert abs(nucleus[0] - 0.5 / 0.8) < 0.04
    full = counts(1.0)  # no truncation: every token, at its probability
    np.testing.assert_allclose(full, probs, atol=0.03)
    assert full[3] > 0
    np.testing.assert_array_equal(counts(1.0, temperature=0.0), [1, 0, 0, 0])  # greedy
    # the padding mask
    ids = np.asarray(draw(logits, jax.random.key(1), 1.0, 1.0, vocab_size=2))
    assert set(np.unique(ids)) <= {0, 1}


def test_generate_rejects_bad_arguments():
    model = _model()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, jnp.zeros((2, 0), jnp.int32), 3, key)
    with pytest.raises(ValueError, match="num_new"):
        generate(model, _ids(0, (1, 3)), 0, key)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, _ids(0, (1, 3)), 3, key, top_p=0.0)
    with pytest.raises(ValueError, match="prompt ids"):
        generate(model, jnp.full((1, 3), VOCAB), 3, key)


def test_generate_bound_gives_generate_splits_tokens():
    """ar.generate_bound (graph, state layout and length bound; what the harness's ArGenerator
    runs) samples the tokens of generate_split, and is built once per length."""
    model = _model(seed=3)
    graphdef, state = nnx.split(model)
    prompt, key = _ids(1, (2, 3)), jax.random.key(4)
    t, p = jnp.float32(0.8), jnp.float32(0.9)
    want = ar.generate_split(graphdef, state, prompt, key, t, p, 6)
    run, params = ar.generate_bound(graphdef, state, 6)
    np.testing.assert_array_equal(np.asarray(run(params, prompt, key, t, p)), np.asarray(want))
    assert run is ar.generate_bound(graphdef, state, 6)[0]
    assert ar.generate_bound(graphdef, state, 5)[0] is not run


def _ar_config():
    config = default_config()
    for k, v in SIZES.items():
        setattr(config.model, k, v)
    config.sample.length = 5
    return config


class _Tokenizer:
    """Minimal tokenizer (the Task needs vocab_size, eos_id and decode)."""
    vocab_size = VOCAB
    eos_id = VOCAB - 1

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids if int(i) != self.eos_id)


def test_ar_task_loss_training_samples_and_flops():
    task = ArTask(_ar_config(), _Tokenizer())
    model = task.init_model(nnx.Rngs(0))
    tokens = _ids(3, (2, 11))
    logits = np.asarray(jitted(model)(tokens[:, :-1]), np.float64)  # before training

    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(p):
            return task.loss(nnx.merge(graphdef, p), {"tokens": tokens}, jax.random.key(0))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, metrics, grads

    opt_state = opt.init(params)
    losses = []
    for i in range(8):
        params, opt_state, loss, metrics, grads = train_step(params, opt_state)
        losses.append(float(loss))
        if i == 0:  # the loss and metrics at the initial parameters, against numpy
            assert set(metrics) == {"ce", "accuracy"}
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            targets = np.asarray(tokens[:, 1:])
            want = -np.take_along_axis(logp, targets[..., None], -1).mean()
            assert abs(float(loss) - want) < 1e-4
            assert abs(float(metrics["accuracy"]) - (logits.argmax(-1) == targets).mean()) < 1e-6
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert losses[-1] < losses[0] - 0.3, losses  # gradients flow: one batch is being learned

    texts = task.sample_text(model, jax.random.key(0), 2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    # FLOPs: at least 6 x (matmul parameters) per token (fwd+bwd), plus a bounded SSD share
    mixer = model.layers[0].mixer
    matmul_params = (mixer.d_in_proj * 32 + mixer.d_inner * 32) + 64 * 32  # 1 layer + head
    flops = task.flops_per_token(10)
    assert 6 * matmul_params <= flops <= 1.5 * 6 * matmul_params, (flops, 6 * matmul_params)


def test_ar_task_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        ArTask(_ar_config())
    with pytest.raises(ValueError, match="tokenizer"):
        ArTask(_ar_config(), vocab_size=VOCAB).sample_text(_model(), jax.random.key(0), 1)


def _vocab_dots(jaxpr, v_pad):
    """(operand dtypes) of every dot_general in `jaxpr` and its sub-jaxprs that touches the
    padded vocabulary (an operand or the output with a dimension v_pad)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = [v.aval.shape for v in eqn.invars] + [eqn.outvars[0].aval.shape]
            if any(v_pad in s for s in shapes):
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _vocab_dots(inner, v_pad)
    return found


@pytest.mark.parametrize("head_dtype,want", [(None, "float32"), ("bfloat16", "bfloat16")])
def test_head_gemms_forward_and_backward_take_the_head_dtype(head_dtype, want):
    """The head's three vocabulary-sized GEMMs (logits, and the backward's two) take operands in
    head_dtype (None: the compute dtype, here float32); config.model.head_dtype reaches the
    model; the logits are float32 either way, within bf16 rounding of the float32 head's."""
    hd = None if head_dtype is None else getattr(jnp, head_dtype)
    model, ids = _model(head_dtype=hd, padded_vocab_size=80), _ids()  # 80: no other dim
    graphdef, state = nnx.split(model)
    loss = lambda st: nnx.merge(graphdef, st)(ids).sum()  # noqa: E731
    dots = _vocab_dots(jax.make_jaxpr(jax.grad(loss))(state).jaxpr, model.padded_vocab_size)
    assert len(dots) == 3 and all(d == (want, want) for d in dots), dots
    logits = jitted(model)(ids)
    ref = jitted(_model(padded_vocab_size=80))(ids)
    assert logits.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(logits - ref)) / jnp.max(jnp.abs(ref)))
    assert (err == 0.0) if head_dtype is None else (0.0 < err < 2e-2), err
    from dimba_jax.config import default_config
    from dimba_jax.models.ar import lm_from_config
    m = default_config().model
    m.d_model, m.n_layers, m.ssd_impl, m.head_dtype = 32, 1, "reference", "bfloat16"
    assert lm_from_config(m, VOCAB, rngs=nnx.Rngs(0)).head_dtype == jnp.bfloat16
    with m.unlocked():
        del m.head_dtype  # a run saved before the key existed: the compute dtype
    assert lm_from_config(m, VOCAB, rngs=nnx.Rngs(0)).head_dtype == jnp.dtype(m.compute_dtype)
