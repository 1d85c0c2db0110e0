"""dimba_jax.models"""
