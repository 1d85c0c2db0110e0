"""dimba_jax.interop"""
