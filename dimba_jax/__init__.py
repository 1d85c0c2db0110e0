"""dimba_jax: DIMBA (diffusion over token embeddings with a Mamba-2 denoiser) in JAX/Flax."""

__version__ = "0.1.0"
