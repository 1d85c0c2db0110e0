"""Read and write mamba_ssm / Hugging Face Hub-layout Mamba-2 checkpoint directories.

A checkpoint directory (as published for state-spaces/mamba2-130m ... mamba2-2.7b) holds

    config.json            mamba_ssm MambaConfig: d_model, n_layer, vocab_size, ssm_cfg
                           {"layer": "Mamba2", ...}, pad_vocab_size_multiple, tie_embeddings, ...
    model.safetensors      the state dict (read with `safetensors.numpy`, no torch needed), or
    model.safetensors.index.json + shards, or
    pytorch_model.bin      a torch.save'd state dict (needs torch: `pip install "dimba_jax[torch]"`)

Vocabulary padding: config.json's vocab_size is the tokenizer's size; the embedding has that
many rows rounded up to pad_vocab_size_multiple (mamba_ssm's rule). Our `MambaLM` keeps both
numbers (`vocab_size`, `padded_vocab_size`); if a file's embedding has a different row count
that still covers vocab_size, that row count is used as the padded size.

The code here reads and writes files and fills a given `MambaLM` (`load_into_lm`); building one
from a directory is `dimba_jax.models.pretrained.load_pretrained` (with its command line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from dimba_jax.interop import mamba_ssm as names

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"


# ----------------------------------------------------------------------------------- reading

def _torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor -> numpy array with the same bits (bfloat16 via ml_dtypes)."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_state_dict(ckpt_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checkpoint's parameters as {mamba_ssm name: numpy array} (exact dtypes and bits).

    Prefers model.safetensors (or its sharded index), then pytorch_model.bin.
    Raises FileNotFoundError when none exists, ImportError (with the fix) when only a .bin
    exists and torch is not installed.
    """
    d = Path(ckpt_dir)
    if (d / SAFETENSORS_FILE).is_file():
        from safetensors.numpy import load_file

        return dict(load_file(str(d / SAFETENSORS_FILE)))
    if (d / SAFETENSORS_INDEX).is_file():
        from safetensors.numpy import load_file

        index = json.loads((d / SAFETENSORS_INDEX).read_text())
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(d / shard)))
        return state
    if (d / TORCH_FILE).is_file():
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{d / TORCH_FILE} is a PyTorch file: install torch "
                              f"(pip install \"dimba_jax[torch]\") or convert it to "
                              f"{SAFETENSORS_FILE}") from err
        raw = torch.load(str(d / TORCH_FILE), map_location="cpu", weights_only=True)
        return {k: _torch_to_numpy(v) for k, v in raw.items()}
    raise FileNotFoundError(f"no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {TORCH_FILE} in "
                            f"{d}")


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory as a dict (FileNotFoundError if missing)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d} has no {CONFIG_FILE}")
    return json.loads((d / CONFIG_FILE).read_text())


def read_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, state dict) of a checkpoint directory."""
    return read_config(ckpt_dir), read_state_dict(ckpt_dir)


def lm_kwargs(config: Mapping, state_dict: Mapping[str, np.ndarray]) -> dict:
    """MambaLM constructor kwargs for a checkpoint, with the padded vocabulary from the file."""
    kwargs = names.lm_kwargs_from_config(config)
    emb = state_dict.get("backbone.embedding.weight")
    if emb is None:
        raise ValueError("checkpoint has no backbone.embedding.weight")
    rows = int(emb.shape[0])
    if rows < kwargs["vocab_size"]:
        raise ValueError(f"embedding has {rows} rows but config vocab_size is "
                         f"{kwargs['vocab_size']}")
    kwargs["padded_vocab_size"] = rows
    return kwargs


# ------------------------------------------------------------------------------------ import

def load_into_lm(model, ckpt_dir: str | os.PathLike) -> None:
    """Loads a checkpoint into an existing `MambaLM` (e.g. built from config.model).

    The architectures must agree (d_model, n_layers, d_state, expand, headdim, ngroups, d_conv,
    vocabulary, tying); a ValueError lists every mismatch. chunk_size may differ.
    """
    config, state = read_checkpoint(ckpt_dir)
    want = lm_kwargs(config, state)
    mixer = model.layers[0].mixer
    have = dict(vocab_size=model.vocab_size, d_model=model.d_model, n_layers=model.n_layers,
                d_state=mixer.d_state, expand=mixer.expand, headdim=mixer.headdim,
                ngroups=mixer.ngroups, d_conv=mixer.d_conv, tie_embeddings=model.tie_embeddings,
                padded_vocab_size=model.padded_vocab_size)
    diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
    if diff:
        raise ValueError(f"checkpoint {ckpt_dir} does not match the model (model, checkpoint): "
                         f"{diff}")
    names.load_lm(model, state)


# ------------------------------------------------------------------------------------ export

def save_pretrained(model, out_dir: str | os.PathLike, *, fmt: str = "safetensors",
                    overwrite: bool = False) -> Path:
    """Writes a `MambaLM` as a mamba_ssm checkpoint directory (config.json + weights).

    Args:
      fmt: "safetensors" (model.safetensors, no torch) or "bin" (pytorch_model.bin, torch).
      overwrite: replace existing files; otherwise an existing config/weights file raises
        FileExistsError (nothing already saved is overwritten by accident).
    Returns the directory. Parameters keep their dtype, so import -> export is bit-exact.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"save_pretrained: fmt must be 'safetensors' or 'bin', got {fmt!r}")
    d = Path(out_dir)
    weights = d / (SAFETENSORS_FILE if fmt == "safetensors" else TORCH_FILE)
    for f in (d / CONFIG_FILE, weights):
        if f.exists() and not overwrite:
            raise FileExistsError(f"{f} exists; pass overwrite=True to replace it")
    d.mkdir(parents=True, exist_ok=True)
    state = names.lm_state_dict(model)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(weights),
                  metadata={"format": "pt"})
    else:
        import torch

        torch.save({k: _numpy_to_torch(v) for k, v in state.items()}, str(weights))
    (d / CONFIG_FILE).write_text(json.dumps(names.config_from_lm(model), indent=2) + "\n")
    return d


def _numpy_to_torch(array: np.ndarray):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def state_dicts_bit_equal(original: Mapping[str, np.ndarray],
                          exported: Mapping[str, np.ndarray]) -> bool:
    """True when every array of `original` is in `exported` with the same dtype, shape and bits.

    `exported` may add lm_head.weight when the original omitted it (tied embeddings saved once),
    provided it equals the embedding bit for bit.
    """
    extra = set(exported) - set(original)
    if extra - {"lm_head.weight"}:
        return False
    if extra and not _bit_equal(exported["lm_head.weight"],
                                exported["backbone.embedding.weight"]):
        return False
    return all(k in exported and _bit_equal(original[k], exported[k]) for k in original)


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

