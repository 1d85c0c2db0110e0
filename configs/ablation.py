"""ablation: a DIMBA small enough to train in about a minute on one H200, for trying levers.

Launch manual
-------------
Data: the shared Gutenberg corpus, as for configs/small.py (`$DIMBA_DATA`, default `.gpu/data`).
    python -m dimba_jax.main --config configs/ablation.py --workdir runs/abl
One lever at a time, e.g. the paper's x0-MSE objective with uniform noise levels:
    python -m dimba_jax.main --config configs/ablation.py --workdir runs/abl_mse \\
        --config.model.readout=direct --config.model.skip_logits=False \\
        --config.diffusion.mse_weight=1 --config.diffusion.noise_sampling=uniform \\
        --config.sample.grid=uniform --config.sample.clamp=True
`python -m benchmarks.quality_study --study ablation` trains the levers of record side by side on one
GPU (with the AR model of the same size, which also judges the samples) and measures them.

Model: d_model 256, 6 bidirectional Mamba-2 blocks (headdim 64, d_state 64), FiLM, tied head,
BPE 8k; ~6.1M parameters (2.1M of them the embedding), bf16 mixers.
Budget: 1200 steps x 64 windows x 256 tokens = 19.7M tokens.
"""

from dimba_jax.config import default_config, use_shared_corpus


def get_config():
    c = default_config()
    c.task = "dimba"
    c.model.d_model = 256
    c.model.n_layers = 6
    c.model.d_state = 64
    c.model.headdim = 64
    c.model.chunk_size = 128
    c.model.time_embed_dim = 128
    c.model.compute_dtype = "bfloat16"
    c.model.ssd_impl = "auto"
    use_shared_corpus(c)
    c.data.seq_len = 256
    c.train.steps = 1200
    c.train.batch_size = 64
    c.train.lr = 2e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.1
    c.train.checkpoint_every = 1200
    c.train.log_every = 50
    c.train.sample_every = 0
    c.train.eval_every = 0
    c.train.eval_batches = 4
    c.sample.length = 256
    c.sample.steps = 32
    return c
