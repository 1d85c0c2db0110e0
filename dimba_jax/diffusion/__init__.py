"""dimba_jax.diffusion"""
