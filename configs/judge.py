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
context 512 so it judges 256-1024-token samples in overlapping windows.
"""

from dimba_jax.config import default_config, use_shared_corpus


def get_config():
    c = default_config()
    c.task = "ar"
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.d_state = 128
    c.model.headdim = 64
    c.model.chunk_size = 256
    c.model.bidirectional = False
    c.model.compute_dtype = "bfloat16"
    c.model.ssd_impl = "auto"
    use_shared_corpus(c)  # $DIMBA_DATA (default .gpu/data): source, val_source, bpe, token cache
    c.data.seq_len = 512
    c.train.steps = 3000
    c.train.batch_size = 64
    c.train.lr = 1.5e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 0.1
    c.train.ema_decay = 0.0  # scoring uses the raw weights
    c.train.checkpoint_every = 500
    c.train.log_every = 50
    c.train.sample_every = 0
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.sample.length = 128
    c.sample.num_samples = 2
    return c
