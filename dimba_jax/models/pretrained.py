"""A `MambaLM` built from a mamba_ssm / Hugging Face Hub-layout Mamba-2 checkpoint directory.

The file format (config.json + model.safetensors / pytorch_model.bin) and the name mapping
live in `dimba_jax.interop`; this module builds the model they fill.

    python -m dimba_jax.models.pretrained inspect CKPT_DIR
    python -m dimba_jax.models.pretrained roundtrip CKPT_DIR OUT_DIR   # import, export, compare
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimba_jax.interop import mamba_ssm as names
from dimba_jax.interop.checkpoint import (lm_kwargs, read_checkpoint, read_state_dict,
                                          save_pretrained, state_dicts_bit_equal)
from dimba_jax.models.ar import MambaLM


def load_pretrained(ckpt_dir: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    ssd_impl: str = "auto", chunk_size: int | None = None,
                    seed: int = 0) -> MambaLM:
    """A `MambaLM` with the checkpoint's architecture and weights.

    Args:
      ckpt_dir: mamba_ssm-layout directory (config.json + weights; `dimba_jax.interop.checkpoint`).
      dtype, param_dtype: compute and parameter dtypes of the returned model.
      ssd_impl: SSD implementation; chunk_size: overrides ssm_cfg.chunk_size (compute only).
      seed: only seeds the throw-away initialisation that the weights overwrite.
    """
    config, state = read_checkpoint(ckpt_dir)
    kwargs = lm_kwargs(config, state)
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    vocab_size = kwargs.pop("vocab_size")
    model = MambaLM(vocab_size, ssd_impl=ssd_impl, dtype=dtype, param_dtype=param_dtype,
                    rngs=nnx.Rngs(seed), **kwargs)
    names.load_lm(model, state)
    return model


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dimba_jax.models.pretrained",
                                     description="Inspect / round-trip mamba_ssm Mamba-2 "
                                                 "checkpoints.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="print the architecture and parameter count")
    p_inspect.add_argument("ckpt_dir")
    p_rt = sub.add_parser("roundtrip", help="import, export to OUT_DIR, check bit equality")
    p_rt.add_argument("ckpt_dir")
    p_rt.add_argument("out_dir")
    p_rt.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    args = parser.parse_args(argv)

    model = load_pretrained(args.ckpt_dir)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(json.dumps({"config": names.config_from_lm(model),
                      "padded_vocab_size": model.padded_vocab_size,
                      "parameters": n_params}, indent=2))
    if args.cmd == "roundtrip":
        save_pretrained(model, args.out_dir, fmt=args.format)
        same = state_dicts_bit_equal(read_state_dict(args.ckpt_dir),
                                     read_state_dict(args.out_dir))
        print(f"round trip bit-exact: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    _main()
