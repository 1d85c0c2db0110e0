"""judge: a larger causal Mamba-2 LM trained on the shared corpus, used only to score text
(judge perplexity of generated samples; dimba_jax/evaluate/judge.py).

Launch manual
-------------
Data as in configs/small.py (`$DIMBA_DATA`, default `.gpu/data`, or --config.data.source=...).
    python -m dimba_jax.main --config configs/judge.py --workdir runs/judge
Resumable: rerun the same command (it continues from the latest checkpoint; copy runs/judge
between machines to continue elsewhere). For a shorter run: --config.train.steps=1500.
Check it: python -m dimba_jax.main --workdir runs/judge --mode eval  (validation loss/accuracy)

Model: d_model 768, 12 causal Mamba-2 blocks (headdim 64, d_state 128), BPE 8k, ~52M
parameters (larger than the compared models: DIMBA small ~33M, ar_small ~32M);
context 512 so it judges 256-1024-token samples in overlapping windows. Built on
configs/small.py (same corpus, tokenizer, schedule, weight decay and logging); only what differs
is set here.
"""

from dimba_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "small")  # same data, tokenizer, optimizer shape and logging
    c.task = "ar"
    c.model.d_model = 768
    c.model.d_state = 128
    c.model.chunk_size = 256
    c.model.bidirectional = False
    c.model.time_embed_dim = 128  # not used by the AR task (the library default)
    c.model.posterior_input = False  # a DIMBA stem's input; the AR model has none
    c.data.seq_len = 512
    c.train.steps = 3000
    c.train.batch_size = 64
    c.train.lr = 1.5e-3
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.0  # scoring uses the raw weights
    c.train.checkpoint_every = 500
    c.train.sample_every = 0
    c.sample.length = 128
    c.sample.steps = 32  # not used by the AR task (the library default)
    c.sample.num_samples = 2
    return c
