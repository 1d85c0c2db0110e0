"""dimba_jax.train"""
