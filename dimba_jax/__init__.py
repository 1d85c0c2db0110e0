"""dimba_jax: DIMBA (diffusion over token embeddings with a Mamba-2 denoiser) in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["load"]


def __getattr__(name):
    """Lazy `dimba_jax.load` (see dimba_jax/api.py), so `import dimba_jax` stays light."""
    if name == "load":
        from dimba_jax.api import load
        return load
    raise AttributeError(f"module 'dimba_jax' has no attribute {name!r}")
