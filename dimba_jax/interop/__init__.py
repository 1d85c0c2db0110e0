"""Interoperability with mamba_ssm's Mamba-2 (names, checkpoints, warm start).

- `dimba_jax.interop.mamba_ssm`: parameter name/layout mapping (state dict <-> modules).
- `dimba_jax.interop.checkpoint`: read/write config.json + model.safetensors / pytorch_model.bin
  (into a given model; `dimba_jax.models.pretrained` builds one).
- `dimba_jax.interop.warm_start`: initialise DIMBA denoiser blocks + embedding from a checkpoint.
"""
