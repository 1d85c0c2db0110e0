"""Name and layout mapping between mamba_ssm's Mamba-2 state dicts and dimba_jax modules.

A mamba_ssm state dict is a flat mapping `name -> numpy array` (PyTorch layout). One Mamba-2
mixer (`mamba_ssm.modules.mamba2.Mamba2`) maps onto our `dimba_jax.layers.mamba2.Mamba2` as:

    mamba_ssm name        shape (torch)                  dimba_jax attribute     transform
    in_proj.weight        (d_in_proj, d_model)           in_proj.kernel          transpose
    conv1d.weight         (conv_dim, 1, d_conv)          conv_weight             [:, 0, :].T
    conv1d.bias           (conv_dim,)                    conv_bias               -
    dt_bias               (nheads,)                      dt_bias                 -
    A_log                 (nheads,)                      A_log                   -
    D                     (nheads,)                      D                       -
    norm.weight           (d_inner,)                     norm.weight             -
    out_proj.weight       (d_model, d_inner)             out_proj.kernel         transpose

The in_proj rows are [z | x | B | C | dt] in both (we split in mamba_ssm's order), and the conv
channels are [x | B | C] in both, so no permutation is needed. A whole `MambaLMHeadModel`
(`MambaLM` here) adds:

    backbone.embedding.weight         (V_pad, d_model)   embedding.embedding      -
    backbone.layers.{i}.norm.weight   (d_model,)         layers[i].norm.weight    -
    backbone.layers.{i}.mixer.*       (the table above)  layers[i].mixer.*
    backbone.norm_f.weight            (d_model,)         norm_f.weight            -
    lm_head.weight                    (V_pad, d_model)   lm_head.kernel (.T)      transpose;
                                                         with tied embeddings it must equal
                                                         the embedding and is not stored twice

Arrays are converted to the target parameter's dtype on import; export returns each parameter
in its own dtype (float32 parameters round-trip bit for bit).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

def padded_vocab(vocab_size: int, multiple: int) -> int:
    """vocab_size rounded up to a multiple of `multiple` (mamba_ssm's pad_vocab_size_multiple)."""
    if vocab_size <= 0 or multiple <= 0:
        raise ValueError(f"vocab_size ({vocab_size}) and multiple ({multiple}) must be positive")
    return -(-vocab_size // multiple) * multiple


MIXER_KEYS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D",
              "norm.weight", "out_proj.weight")


def _mixer_torch_shapes(block) -> dict[str, tuple[int, ...]]:
    return {
        "in_proj.weight": (block.d_in_proj, block.d_model),
        "conv1d.weight": (block.conv_dim, 1, block.d_conv),
        "conv1d.bias": (block.conv_dim,),
        "dt_bias": (block.nheads,),
        "A_log": (block.nheads,),
        "D": (block.nheads,),
        "norm.weight": (block.d_inner,),
        "out_proj.weight": (block.d_model, block.d_inner),
    }


def get_array(state_dict: Mapping[str, np.ndarray], name: str,
              shape: tuple[int, ...]) -> np.ndarray:
    """state_dict[name] as numpy, checked to have `shape` (ValueError naming it otherwise)."""
    if name not in state_dict:
        raise ValueError(f"state dict has no parameter {name!r}")
    value = np.asarray(state_dict[name])
    if value.shape != tuple(shape):
        raise ValueError(f"parameter {name!r} has shape {value.shape}, expected {tuple(shape)} "
                         f"for this module's configuration")
    return value


def assign_param(variable, value: np.ndarray) -> None:
    """Writes `value` into an nnx.Param, converting to the parameter's dtype."""
    variable[...] = jnp.asarray(value, dtype=variable[...].dtype)


def load_mixer(block, state_dict: Mapping[str, np.ndarray], prefix: str = "") -> None:
    """Copies one mamba_ssm Mamba-2 mixer's parameters into a dimba_jax `Mamba2` in place.

    Args:
      block: dimba_jax.layers.mamba2.Mamba2 whose sizes match the checkpoint.
      state_dict: name -> numpy array in PyTorch layout (see the module table).
      prefix: prepended to every name, e.g. "backbone.layers.3.mixer.".
    Raises:
      ValueError: a missing parameter or a shape that does not match the block's sizes.
    """
    shapes = _mixer_torch_shapes(block)
    p = {k: get_array(state_dict, prefix + k, shapes[k]) for k in MIXER_KEYS}
    assign_param(block.in_proj.kernel, p["in_proj.weight"].T)
    assign_param(block.conv_weight, p["conv1d.weight"][:, 0, :].T)
    assign_param(block.conv_bias, p["conv1d.bias"])
    assign_param(block.dt_bias, p["dt_bias"])
    assign_param(block.A_log, p["A_log"])
    assign_param(block.D, p["D"])
    assign_param(block.norm.weight, p["norm.weight"])
    assign_param(block.out_proj.kernel, p["out_proj.weight"].T)


def mixer_state_dict(block, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `load_mixer`: a dimba_jax `Mamba2` -> {prefix + mamba_ssm name: array}."""
    arr = lambda v: np.asarray(v[...])  # noqa: E731
    return {
        prefix + "in_proj.weight": np.ascontiguousarray(arr(block.in_proj.kernel).T),
        prefix + "conv1d.weight": np.ascontiguousarray(arr(block.conv_weight).T[:, None, :]),
        prefix + "conv1d.bias": arr(block.conv_bias),
        prefix + "dt_bias": arr(block.dt_bias),
        prefix + "A_log": arr(block.A_log),
        prefix + "D": arr(block.D),
        prefix + "norm.weight": arr(block.norm.weight),
        prefix + "out_proj.weight": np.ascontiguousarray(arr(block.out_proj.kernel).T),
    }


def lm_state_dict_names(n_layers: int, include_lm_head: bool = True) -> list[str]:
    """Every parameter name of a Mamba-2 `MambaLMHeadModel` with n_layers layers."""
    names = ["backbone.embedding.weight"]
    for i in range(n_layers):
        names.append(f"backbone.layers.{i}.norm.weight")
        names += [f"backbone.layers.{i}.mixer.{k}" for k in MIXER_KEYS]
    names.append("backbone.norm_f.weight")
    if include_lm_head:
        names.append("lm_head.weight")
    return names


def load_lm(model, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copies a mamba_ssm MambaLMHeadModel (Mamba-2 mixers) state dict into a `MambaLM`.

    Every name of `lm_state_dict_names` must be present (lm_head.weight may be absent when the
    embeddings are tied; when present with tied embeddings it must equal the embedding), and no
    other name may be: unknown names (attention layers, MLPs, another architecture) raise.

    Raises:
      ValueError naming the missing, unexpected or mis-shaped parameter.
    """
    expected = set(lm_state_dict_names(model.n_layers))
    unknown = sorted(set(state_dict) - expected)
    if unknown:
        raise ValueError(f"state dict has parameters a Mamba-2 LM with {model.n_layers} layers "
                         f"does not: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    v_pad, d = model.padded_vocab_size, model.d_model
    emb = get_array(state_dict, "backbone.embedding.weight", (v_pad, d))
    assign_param(model.embedding.embedding, emb)
    for i, layer in enumerate(model.layers):
        norm = get_array(state_dict, f"backbone.layers.{i}.norm.weight", (d,))
        assign_param(layer.norm.weight, norm)
        load_mixer(layer.mixer, state_dict, prefix=f"backbone.layers.{i}.mixer.")
    assign_param(model.norm_f.weight, get_array(state_dict, "backbone.norm_f.weight", (d,)))
    if model.lm_head is None:
        if "lm_head.weight" in state_dict:
            head = get_array(state_dict, "lm_head.weight", (v_pad, d))
            if not np.array_equal(head, emb):
                raise ValueError("lm_head.weight differs from backbone.embedding.weight but the "
                                 "model ties its embeddings (build it with tie_embeddings=False)")
    else:
        assign_param(model.lm_head.kernel, get_array(state_dict, "lm_head.weight", (v_pad, d)).T)


def lm_state_dict(model) -> dict[str, np.ndarray]:
    """Inverse of `load_lm`: MambaLM -> mamba_ssm state dict (numpy, torch layout).

    lm_head.weight is always included (a copy of the embedding when tied), as in mamba_ssm's
    own `state_dict()`, so strict loaders accept it.
    """
    sd = {"backbone.embedding.weight": np.asarray(model.embedding.embedding[...])}
    for i, layer in enumerate(model.layers):
        sd[f"backbone.layers.{i}.norm.weight"] = np.asarray(layer.norm.weight[...])
        sd.update(mixer_state_dict(layer.mixer, prefix=f"backbone.layers.{i}.mixer."))
    sd["backbone.norm_f.weight"] = np.asarray(model.norm_f.weight[...])
    if model.lm_head is None:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"].copy()
    else:
        sd["lm_head.weight"] = np.ascontiguousarray(np.asarray(model.lm_head.kernel[...]).T)
    return sd


# ------------------------------------------------------------------------------ configuration

# mamba_ssm Mamba2 defaults (mamba_ssm/modules/mamba2.py) for keys absent from ssm_cfg.
_SSM_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256)
# ssm_cfg keys whose non-default value we cannot represent, with the value we require.
_SSM_REQUIRED = dict(rmsnorm=True, norm_before_gate=False, D_has_hdim=False, bias=False,
                     conv_bias=True, d_ssm=None, dt_limit=None)
_TOP_REQUIRED = dict(d_intermediate=0, attn_layer_idx=[], rms_norm=True, residual_in_fp32=True)


def lm_kwargs_from_config(config: Mapping) -> dict:
    """mamba_ssm `config.json` (MambaConfig with ssm_cfg layer "Mamba2") -> MambaLM kwargs.

    Returns dict(vocab_size, d_model, n_layers, d_state, expand, headdim, ngroups, d_conv,
    chunk_size, tie_embeddings, pad_vocab_size_multiple).
    Raises ValueError for a config this codebase cannot represent (Mamba-1 layers, attention
    layers, MLPs, LayerNorm, D per channel, norm before gate, projection biases, ...), naming
    the field; a Hugging Face `transformers` Mamba2Config (model_type "mamba2") is rejected too.
    """
    if "model_type" in config or "hidden_size" in config:
        raise ValueError("config.json looks like a Hugging Face transformers config; only the "
                         "mamba_ssm layout (d_model, n_layer, ssm_cfg, ...) is supported")
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in config:
            raise ValueError(f"config.json lacks {key!r} (not a mamba_ssm MambaConfig?)")
    ssm = dict(config.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise ValueError(f"ssm_cfg.layer is {ssm.get('layer', 'Mamba1 (default)')!r}; only "
                         f"Mamba2 mixers are supported")
    for key, want in _TOP_REQUIRED.items():
        if key in config and config[key] != want and not (want == [] and not config[key]):
            raise ValueError(f"config.json {key}={config[key]!r} is not supported (need {want!r})")
    for key, want in _SSM_REQUIRED.items():
        if key in ssm and ssm[key] != want:
            if key == "dt_limit" and tuple(ssm[key]) == (0.0, float("inf")):
                continue
            raise ValueError(f"ssm_cfg.{key}={ssm[key]!r} is not supported (need {want!r})")
    known = set(_SSM_DEFAULTS) | set(_SSM_REQUIRED) | {"layer", "dt_min", "dt_max",
                                                       "dt_init_floor", "A_init_range"}
    extra = sorted(set(ssm) - known)
    if extra:
        raise ValueError(f"ssm_cfg has options this codebase does not implement: {extra}")
    mix = {k: int(ssm.get(k, v)) for k, v in _SSM_DEFAULTS.items()}
    return dict(vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]),
                n_layers=int(config["n_layer"]),
                tie_embeddings=bool(config.get("tie_embeddings", True)),
                pad_vocab_size_multiple=int(config.get("pad_vocab_size_multiple", 8)), **mix)


def config_from_lm(model) -> dict:
    """MambaLM -> mamba_ssm `config.json` dict (the inverse of `lm_kwargs_from_config`).

    If the model's padded vocabulary is not vocab_size rounded up to its
    pad_vocab_size_multiple (a file padded by another rule), pad_vocab_size_multiple is written
    as the padded size itself, so that mamba_ssm rebuilds exactly this embedding shape.
    """
    mixer = model.layers[0].mixer
    multiple = model.pad_vocab_size_multiple
    if padded_vocab(model.vocab_size, multiple) != model.padded_vocab_size:
        multiple = model.padded_vocab_size
    return {
        "d_model": model.d_model,
        "d_intermediate": 0,
        "n_layer": model.n_layers,
        "vocab_size": model.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": mixer.d_state, "d_conv": mixer.d_conv,
                    "expand": mixer.expand, "headdim": mixer.headdim,
                    "ngroups": mixer.ngroups, "chunk_size": mixer.chunk_size},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": multiple,
        "tie_embeddings": model.tie_embeddings,
    }
