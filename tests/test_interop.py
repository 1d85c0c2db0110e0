"""mamba_ssm checkpoint import/export and DIMBA warm start (offline: the test writes the
checkpoint directory from the golden 2-layer LM of `shared/data/golden/`)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _nnx_jit import jitted
from dimba_jax.interop import mamba_ssm as names
from dimba_jax.interop.checkpoint import read_state_dict, save_pretrained, state_dicts_bit_equal
from dimba_jax.interop.warm_start import warm_start_denoiser
from dimba_jax.layers.mamba2 import BidirectionalMamba2, Mamba2
from dimba_jax.layers.norms import RMSNorm
from dimba_jax.models.pretrained import load_pretrained

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "golden"
LM_FILE = GOLDEN / "mamba2_lm_2layer.npz"
MIXER = dict(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=32)

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden outputs not found at {GOLDEN}")

# What state-spaces/mamba2-* publish as config.json, with the golden LM's sizes.
CONFIG = {"d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 300,
          "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32},
          "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
          "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}


def golden_lm():
    data = np.load(LM_FILE)
    params = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
    return params, jnp.asarray(data["input_ids"], jnp.int32), data["logits"]


def write_checkpoint(directory: Path, state: dict, config: dict = CONFIG, fmt="safetensors"):
    """A mamba_ssm-layout checkpoint directory, as the published ones look."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                  str(directory / "model.safetensors"))
    else:
        import torch

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                   str(directory / "pytorch_model.bin"))
    return directory


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_import_reproduces_golden_and_export_round_trips_bit_for_bit(tmp_path):
    params, ids, logits = golden_lm()
    ckpt = write_checkpoint(tmp_path / "ckpt", params)
    model = load_pretrained(ckpt, ssd_impl="xla")
    assert (model.vocab_size, model.padded_vocab_size) == (300, 304)
    got = jitted(model)(ids)
    assert rel_err(got, logits) <= 1e-4
    out = save_pretrained(model, tmp_path / "export")
    assert state_dicts_bit_equal(read_state_dict(ckpt), read_state_dict(out))
    exported_config = json.loads((out / "config.json").read_text())
    assert names.lm_kwargs_from_config(exported_config) == names.lm_kwargs_from_config(CONFIG)
    again = load_pretrained(out, ssd_impl="xla")
    np.testing.assert_array_equal(np.asarray(jitted(again)(ids)), np.asarray(got))
    with pytest.raises(FileExistsError):
        save_pretrained(again, out)  # nothing already saved is overwritten silently


def test_tied_head_stored_once_and_untied_head(tmp_path):
    params, ids, logits = golden_lm()
    once = {k: v for k, v in params.items() if k != "lm_head.weight"}  # HF-style de-duplication
    model = load_pretrained(write_checkpoint(tmp_path / "a", once), ssd_impl="xla")
    assert rel_err(jitted(model)(ids), logits) <= 1e-4
    # an untied checkpoint: the head is read from lm_head.weight
    untied = dict(params, **{"lm_head.weight": params["lm_head.weight"] * 2.0})
    model = load_pretrained(write_checkpoint(tmp_path / "b", untied,
                                             dict(CONFIG, tie_embeddings=False)), ssd_impl="xla")
    assert model.lm_head is not None
    assert rel_err(jitted(model)(ids), 2.0 * logits) <= 1e-4
    assert state_dicts_bit_equal(untied, read_state_dict(save_pretrained(model, tmp_path / "c")))
    # tied config but different head weights: refuse rather than silently drop one
    with pytest.raises(ValueError, match="tie"):
        load_pretrained(write_checkpoint(tmp_path / "d", untied))


def test_vocab_padding_from_the_file(tmp_path):
    params, ids, logits = golden_lm()
    # pad multiple 8 gives the same 304 rows
    model = load_pretrained(write_checkpoint(tmp_path / "a", params,
                                             dict(CONFIG, pad_vocab_size_multiple=8)))
    assert model.padded_vocab_size == 304
    # a file padded to 320 rows by some other rule: keep its rows, export reproducible config
    wide = dict(params)
    for k in ("backbone.embedding.weight", "lm_head.weight"):
        wide[k] = np.concatenate([params[k], np.zeros((16, 64), np.float32)])
    model = load_pretrained(write_checkpoint(tmp_path / "b", wide), ssd_impl="xla")
    assert (model.vocab_size, model.padded_vocab_size) == (300, 320)
    assert rel_err(jitted(model)(ids)[..., :304], logits) <= 1e-4
    out = save_pretrained(model, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    multiple = cfg["pad_vocab_size_multiple"]
    assert -(-cfg["vocab_size"] // multiple) * multiple == 320  # mamba_ssm rebuilds 320 rows
    # fewer rows than the vocabulary: an error
    short = dict(params, **{k: params[k][:280]
                            for k in ("backbone.embedding.weight", "lm_head.weight")})
    with pytest.raises(ValueError, match="rows"):
        load_pretrained(write_checkpoint(tmp_path / "d", short))


def test_pytorch_bin_import_and_export(tmp_path):
    pytest.importorskip("torch", reason="the .bin path needs the optional torch extra")
    params, ids, logits = golden_lm()
    ckpt = write_checkpoint(tmp_path / "bin", params, fmt="bin")
    model = load_pretrained(ckpt, ssd_impl="xla")
    assert rel_err(jitted(model)(ids), logits) <= 1e-4
    out = save_pretrained(model, tmp_path / "out", fmt="bin")
    assert (out / "pytorch_model.bin").is_file()
    assert state_dicts_bit_equal(read_state_dict(ckpt), read_state_dict(out))


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    params, _, _ = golden_lm()
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(tmp_path / "empty")
    bad_configs = {
        "mamba1": dict(CONFIG, ssm_cfg={"layer": "Mamba1"}),
        "mlp": dict(CONFIG, d_intermediate=128),
        "attn": dict(CONFIG, attn_layer_idx=[1]),
        "hdim": dict(CONFIG, ssm_cfg=dict(CONFIG["ssm_cfg"], D_has_hdim=True)),
        "hf": {"model_type": "mamba2", "hidden_size": 64},
    }
    for tag, cfg in bad_configs.items():
        with pytest.raises(ValueError):
            load_pretrained(write_checkpoint(tmp_path / tag, params, cfg))
    extra = dict(params, **{"backbone.layers.0.mlp.fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="mlp"):
        load_pretrained(write_checkpoint(tmp_path / "extra", extra))
    wrong = dict(params, **{"backbone.layers.1.mixer.A_log": np.zeros(9, np.float32)})
    with pytest.raises(ValueError, match="A_log"):
        load_pretrained(write_checkpoint(tmp_path / "shape", wrong))


# --------------------------------------------------------------------------------- warm start

class _DenoiserBlock(nnx.Module):
    """Stand-in for a DIMBA block: a pre-norm over d_model and a (bidirectional) mixer."""

    def __init__(self, mixer_cls, rngs, **kw):
        self.norm = RMSNorm(64, rngs=rngs)
        self.mixer = mixer_cls(64, ssd_impl="xla", rngs=rngs, **MIXER, **kw)


@pytest.mark.parametrize("share", [True, False])
def test_warm_start_bidirectional_blocks_and_embedding(tmp_path, share):
    params, _, _ = golden_lm()
    ckpt = write_checkpoint(tmp_path / "ckpt", params)
    rngs = nnx.Rngs(0)
    blocks = [_DenoiserBlock(BidirectionalMamba2, rngs, share_projections=share) for _ in range(2)]
    embedding = nnx.Param(jax.random.normal(jax.random.key(1), (310, 64)))  # our vocab: 310
    emb_before = np.asarray(embedding[...])
    final_norm = RMSNorm(64, rngs=rngs)
    u = jax.random.normal(jax.random.key(2), (2, 16, 64))
    before = jitted(blocks[0].mixer)(u)

    report = warm_start_denoiser(blocks, embedding, ckpt, final_norm=final_norm)
    assert report == dict(layers=2, embedding_rows=300, checkpoint_layers=2)

    after = jitted(blocks[0].mixer)(u)
    assert rel_err(after, before) > 0.1  # the imported weights are used ...
    causal = Mamba2(64, ssd_impl="xla", rngs=nnx.Rngs(3), **MIXER)
    names.load_mixer(causal, params, prefix="backbone.layers.0.mixer.")
    run = jitted(causal)
    manual = 0.5 * (run(u) + jnp.flip(run(jnp.flip(u, 1)), 1))  # ... exactly as documented
    np.testing.assert_allclose(after, manual, rtol=1e-4, atol=1e-5)
    for i, block in enumerate(blocks):
        pre = f"backbone.layers.{i}.mixer."
        for direction in (block.mixer.fwd, block.mixer.bwd):
            np.testing.assert_array_equal(direction.A_log[...], params[pre + "A_log"])
            np.testing.assert_array_equal(direction.in_proj.kernel[...],
                                          params[pre + "in_proj.weight"].T)
        np.testing.assert_array_equal(block.norm.weight[...],
                                      params[f"backbone.layers.{i}.norm.weight"])
    np.testing.assert_array_equal(final_norm.weight[...], params["backbone.norm_f.weight"])
    table = np.asarray(embedding[...])
    np.testing.assert_array_equal(table[:300], params["backbone.embedding.weight"][:300])
    np.testing.assert_array_equal(table[300:], emb_before[300:])  # beyond the checkpoint vocab


def test_warm_start_causal_blocks_and_errors(tmp_path):
    params, _, _ = golden_lm()
    ckpt = write_checkpoint(tmp_path / "ckpt", params)
    rngs = nnx.Rngs(0)
    one = [Mamba2(64, rngs=rngs, **MIXER)]  # shallower than the checkpoint: layer 0 only
    small_vocab = nnx.Param(jnp.zeros((50, 64)))
    assert warm_start_denoiser(one, small_vocab, ckpt)["embedding_rows"] == 50
    np.testing.assert_array_equal(one[0].D[...], params["backbone.layers.0.mixer.D"])
    np.testing.assert_array_equal(small_vocab[...], params["backbone.embedding.weight"][:50])
    with pytest.raises(ValueError, match="only 2 layers"):
        warm_start_denoiser([Mamba2(64, rngs=rngs, **MIXER) for _ in range(3)], None, ckpt)
    with pytest.raises(ValueError, match="d_state"):
        warm_start_denoiser([Mamba2(64, rngs=rngs, **dict(MIXER, d_state=8))], None, ckpt)
    with pytest.raises(ValueError, match="d_model"):
        warm_start_denoiser(one, nnx.Param(jnp.zeros((50, 32))), ckpt)
    with pytest.raises(FileNotFoundError):
        warm_start_denoiser(one, None, tmp_path / "nowhere")


def test_ar_task_starts_from_a_checkpoint_with_one_config_field(tmp_path):
    from dimba_jax.config import default_config
    from dimba_jax.tasks.ar import ArTask

    params, ids, logits = golden_lm()
    config = default_config()
    config.model.d_model, config.model.n_layers = 64, 2
    for k, v in MIXER.items():
        setattr(config.model, k, v)
    config.model.ssd_impl = "xla"
    config.model.head_dtype = "float32"  # the oracle's float32 logits (the default rounds to bf16)
    config.model.init_from_mamba_ssm = str(write_checkpoint(tmp_path / "ckpt", params))
    model = ArTask(config, vocab_size=300).init_model(nnx.Rngs(0))
    assert rel_err(jitted(model)(ids), logits) <= 1e-4
    config.model.d_state = 8  # an architecture that does not match the checkpoint
    with pytest.raises(ValueError, match="d_state"):
        ArTask(config, vocab_size=300).init_model(nnx.Rngs(0))


def test_checkpoint_cli_roundtrip(tmp_path, capsys):
    from dimba_jax.models.pretrained import _main

    params, _, _ = golden_lm()
    ckpt = write_checkpoint(tmp_path / "ckpt", params)
    _main(["roundtrip", str(ckpt), str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "round trip bit-exact: True" in out and '"parameters": 75824' in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dimba_task_warm_starts_from_a_checkpoint_with_one_config_flag(tmp_path):
    """`config.model.init_from_mamba_ssm=DIR` alone makes DimbaTask.init_model load the blocks."""
    from dimba_jax.config import default_config
    from dimba_jax.data.tokenizers import get_tokenizer
    from dimba_jax.tasks.dimba import DimbaTask

    state, _, _ = golden_lm()
    ckpt = write_checkpoint(tmp_path / "ckpt", state)
    config = default_config()
    m = config.model
    m.d_model, m.n_layers, m.d_state, m.headdim, m.expand, m.ngroups, m.chunk_size = 64, 2, 16, 16, 2, 1, 32
    m.init_from_mamba_ssm = str(ckpt)
    model = DimbaTask(config, get_tokenizer("byte")).init_model(nnx.Rngs(0))
    for i, block in enumerate(model.blocks):
        want = state[f"backbone.layers.{i}.mixer.A_log"]
        np.testing.assert_array_equal(np.asarray(block.mixer.fwd.A_log[...]), want)
        np.testing.assert_array_equal(np.asarray(block.mixer.bwd.A_log[...]), want)
        np.testing.assert_array_equal(np.asarray(block.norm.weight[...]), state[f"backbone.layers.{i}.norm.weight"])
    rows = np.asarray(model.embedding[...])
    np.testing.assert_array_equal(rows, state["backbone.embedding.weight"][: rows.shape[0]])
