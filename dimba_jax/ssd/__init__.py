"""dimba_jax.ssd"""
