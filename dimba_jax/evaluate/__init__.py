"""dimba_jax.evaluate"""
