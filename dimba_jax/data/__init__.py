"""dimba_jax.data"""
