"""Exact match with mamba_ssm: reproduce its golden outputs from its own parameters.

The golden files (`shared/data/golden/`, beside the repository clone; see the README there)
hold mamba_ssm 2.3.2's Mamba-2 block (ngroups 1 and 2) and a 2-layer Mamba-2 LM run in float32,
with their parameters under `param/<state-dict name>`. We map the parameters with the
documented functions of `dimba_jax.interop.mamba_ssm` and require relative error <= 1e-4.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import jitted, run_steps
from dimba_jax.interop.mamba_ssm import load_lm, load_mixer
from dimba_jax.layers.mamba2 import Mamba2
from dimba_jax.models.ar import MambaLM

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "golden"
# Sizes stated in the golden README.
BLOCK = dict(d_state=16, d_conv=4, expand=2, headdim=16, chunk_size=32)
LM = dict(d_model=64, n_layers=2, pad_vocab_size_multiple=16, tie_embeddings=True, **BLOCK)
MAX_REL = 1e-4

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(),
                                reason=f"golden outputs not found at {GOLDEN}")


def load_golden(name: str):
    """(arrays without the param/ prefix, state dict {mamba_ssm name: array}) of a golden file."""
    data = np.load(GOLDEN / name)
    arrays = {k: data[k] for k in data.files if not k.startswith("param/")}
    params = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    return arrays, params


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_block_matches_mamba_ssm(ngroups):
    arrays, params = load_golden(f"mamba2_block_g{ngroups}.npz")
    u = jnp.asarray(arrays["u"])
    for impl in ("reference", "xla"):
        block = Mamba2(64, ngroups=ngroups, ssd_impl=impl, rngs=nnx.Rngs(0), **BLOCK)
        y_init = jitted(block)(u)
        load_mixer(block, params)
        y = jitted(block)(u)
        assert rel_err(y, arrays["y"]) <= MAX_REL, (impl, rel_err(y, arrays["y"]))
        assert rel_err(y_init, arrays["y"]) > 0.5  # the loaded weights are what matters
    # the recurrent step from a zero cache (mamba_ssm's `step`)
    y_step, _ = run_steps(block, u[:1, :12], block.init_cache(1))
    want = arrays["y_step_first12_batch0"]
    assert rel_err(y_step, want) <= MAX_REL, rel_err(y_step, want)


def test_lm_matches_mamba_ssm():
    arrays, params = load_golden("mamba2_lm_2layer.npz")
    ids = jnp.asarray(arrays["input_ids"], jnp.int32)
    for impl in ("reference", "xla"):
        model = MambaLM(300, ssd_impl=impl, rngs=nnx.Rngs(0), **LM)
        assert model.padded_vocab_size == arrays["logits"].shape[-1] == 304
        load_lm(model, params)
        logits = jitted(model)(ids)
        err = rel_err(logits, arrays["logits"])
        assert err <= MAX_REL, (impl, err)
    # token-by-token recurrent decoding reproduces the same logits
    step_logits, _ = run_steps(model, ids[:, :20], model.init_cache(2))
    assert rel_err(step_logits, arrays["logits"][:, :20]) <= MAX_REL
