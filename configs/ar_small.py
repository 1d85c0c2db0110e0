"""ar_small: the autoregressive baseline for configs/small.py — a causal Mamba-2 LM with the
same parameter count (~32M vs DIMBA small's ~32.9M), tokenizer, data, batch and steps.

Launch manual
-------------
Data as in configs/small.py (`$DIMBA_DATA`, default `.gpu/data`, or --config.data.source=...).
    python -m dimba_jax.main --config configs/ar_small.py --workdir runs/ar_small
    python -m dimba_jax.main --workdir runs/ar_small --mode sample --prompt "It was a dark" --length 256
    python -m dimba_jax.main --workdir runs/ar_small --mode eval
Same tokens seen as DIMBA small: keep train.steps x train.batch_size x data.seq_len equal.
Sampling: config.ar.temperature / config.ar.top_p (recurrent decoding in one jitted scan).

Model: d_model 512, 17 causal Mamba-2 blocks (headdim 64, d_state 64), tied head.
"""

from dimba_jax.config import default_config, use_shared_corpus


def get_config():
    c = default_config()
    c.task = "ar"
    c.model.d_model = 512
    c.model.n_layers = 17
    c.model.d_state = 64
    c.model.headdim = 64
    c.model.chunk_size = 128
    c.model.bidirectional = False
    c.model.compute_dtype = "bfloat16"
    c.model.ssd_impl = "auto"
    use_shared_corpus(c)  # $DIMBA_DATA (default .gpu/data): source, val_source, bpe, token cache
    c.data.seq_len = 1024
    c.train.steps = 4000
    c.train.batch_size = 16
    c.train.lr = 1e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 0.1
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    c.train.sample_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.sample.length = 1024
    return c
