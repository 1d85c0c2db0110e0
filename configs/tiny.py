"""tiny: DIMBA on 2 CPU cores in under 5 minutes, then English-like samples.

Launch manual
-------------
  python -m dimba_jax.main --config configs/tiny.py --workdir runs/tiny
  python -m dimba_jax.main --workdir runs/tiny --mode sample --prompt "The old man" --steps 32
  python -m dimba_jax.main --workdir runs/tiny --mode eval

Data: the corpus embedded in the package (public-domain books), byte tokenizer (no files).
Model: a small bidirectional Mamba-2 denoiser (see get_config for sizes). Watch
runs/tiny/samples.txt and runs/tiny/metrics.jsonl; TensorBoard: tensorboard --logdir runs/tiny.
Shorter smoke run: --config.train.steps=20. Several processes: launch/local.sh 2 --config ...
"""

from dimba_jax.config import default_config


def get_config():
    c = default_config()
    c.task = "dimba"
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.d_state = 16
    c.model.headdim = 32
    c.model.chunk_size = 32
    c.model.ssd_impl = "xla"
    c.data.source = "embedded"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.lr = 3e-3
    c.train.warmup_steps = 50
    c.train.checkpoint_every = 200
    c.train.log_every = 20
    c.train.eval_batches = 2
    c.sample.length = 128
    c.sample.steps = 32
    return c
