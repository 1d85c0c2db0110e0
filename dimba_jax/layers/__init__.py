"""dimba_jax.layers"""
