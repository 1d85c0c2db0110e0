"""A trained model in one file: the run's config and its weights in a .npz, usable without the workdir.

    python -m dimba_jax.main --workdir runs/abl --mode export --out abl.npz [--no-ema]
    run = load_run("abl.npz")      # dimba_jax.train.inference.load_run reads it like a workdir

A GPU machine that returns only a few small files can hand back a trained model this way, and
sampling, evaluation and judging then run anywhere.

Layout (a numpy .npz: named arrays, no pickles):
  "config"  0-d str array: the run's config as JSON (checkpoint.config_to_dict);
  "meta"    0-d str array: JSON {"format": 1, "step", "uses_ema", "dtype"};
  one array per parameter, named by its path in the model joined with "/"
  ("blocks/0/mixer/fwd/in_proj/kernel"). Floating parameters are stored in `dtype`: "float32", or
  "bfloat16" (half the bytes; kept as its uint16 bit pattern, numpy having no bfloat16) and cast
  back to config.train.param_dtype on load. Only parameters travel; the other variables
  (a frozen prompt encoder's weights) are rebuilt from the config, as when a checkpoint is
  restored.
"""

from __future__ import annotations

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.train import checkpoint as ckpt_lib
from dimba_jax.train import state as state_lib

FORMAT = 1
DTYPES = ("float32", "bfloat16")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def _unflat(template: dict, arrays: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in template.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out[key] = _unflat(value, arrays, name) if isinstance(value, dict) else arrays(name, value)
    return out


def save(path: str, config, model, step: int, uses_ema: bool, dtype: str = "bfloat16") -> str:
    """Writes the one-file model of `model` (an nnx module built from `config`; its nnx.Param
    variables are stored). dtype "float32" | "bfloat16". The file is written next to `path` and
    renamed into place, so an existing file is never left half-written. Returns path."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
    _, params, _ = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    arrays = {}
    for name, value in _flat(params).items():
        a = np.asarray(jax.device_get(value))
        if np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16:
            a = np.asarray(jnp.asarray(a, jnp.dtype(dtype)))
            if dtype == "bfloat16":
                a = a.view(np.uint16)
        arrays[name] = a
    meta = {"format": FORMAT, "step": int(step), "uses_ema": bool(uses_ema), "dtype": dtype}
    arrays["config"] = np.asarray(json.dumps(ckpt_lib.config_to_dict(config)))
    arrays["meta"] = np.asarray(json.dumps(meta))
    tmp = f"{path}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _open(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model {path!r} not found")
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        config = json.loads(str(data["config"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"exported model {path!r} is damaged or not a dimba_jax export "
                         f"({type(e).__name__})") from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise ValueError(f"exported model {path!r} has format {meta.get('format')!r} / dtype "
                         f"{meta.get('dtype')!r}; this version reads format {FORMAT}")
    return data, meta, config


def read_config(path: str):
    """The run's config stored in an exported model file (a full, locked ConfigDict)."""
    _, _, config = _open(path)
    return ckpt_lib.config_from_dict(config)


def load(path: str, task, config) -> tuple[object, dict]:
    """(model with the file's weights, meta dict) for `task` (built from `config`). ValueError, one
    line naming the file and the parameter, for a missing, extra or misshapen parameter."""
    data, meta, _ = _open(path)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(int(config.seed)))
    param_dtype = jnp.dtype(config.train.param_dtype)
    stored = {k for k in data.files if k not in ("config", "meta")}
    used = set()

    def take(name, spec):
        if name not in stored:
            raise ValueError(f"exported model {path!r} has no parameter {name!r} (another architecture?)")
        used.add(name)
        a = data[name]
        if meta["dtype"] == "bfloat16" and a.dtype == np.uint16 and jnp.issubdtype(spec.dtype, jnp.floating):
            a = a.view(jnp.bfloat16)
        if tuple(a.shape) != tuple(spec.shape):
            raise ValueError(f"exported model {path!r}: parameter {name!r} has shape {a.shape}, "
                             f"the config's model needs {tuple(spec.shape)}")
        return jnp.asarray(a, param_dtype if jnp.issubdtype(spec.dtype, jnp.floating) else spec.dtype)

    params = _unflat(parts.abstract_params, take)
    extra = sorted(stored - used)
    if extra:
        raise ValueError(f"exported model {path!r} has parameters the config's model lacks: {extra[:3]}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    rest = state_lib.init_rest(task, parts, int(config.seed),
                               jax.tree.map(lambda _: device, nnx.to_pure_dict(parts.rest_template)))
    return parts.merge(params, rest), meta
