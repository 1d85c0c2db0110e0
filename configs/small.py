"""small: a ~33M-parameter DIMBA on one GPU and the shared Gutenberg corpus (bf16, BPE 8k).

Launch manual
-------------
Data: the shared corpus `../shared/data/gutenberg/*.jsonl.xz` (~41 MB). On a machine without
`../shared`, copy it into an ignored folder of the repo first:
    mkdir -p .gpu/data && cp ../shared/data/gutenberg/*.jsonl.xz .gpu/data/
The data folder is `$DIMBA_DATA` (default `.gpu/data`), or override the sources directly:
    --config.data.source='files:/path/train-*.jsonl.xz' --config.data.val_source='files:/path/validation.jsonl.xz'

Train (one GPU, ~11 minutes on an H100 at the default 8000 steps x 8 x 1024 tokens = 65.5M tokens;
the recipe of record, benchmarks/results/quality_small_post_h100.md):
    python -m dimba_jax.main --config configs/small.py --workdir runs/small
Sample / evaluate:
    python -m dimba_jax.main --workdir runs/small --mode sample --prompt "It was a dark" --steps 64
    python -m dimba_jax.main --workdir runs/small --mode eval
Several GPUs of one host: nothing to change (the `data` mesh axis takes all devices); shard
parameters too with --config.mesh.fsdp=N --config.mesh.data=1. Several hosts:
launch/slurm_gpu.sbatch. Tokenised data is cached in `$DIMBA_DATA/cache` (reused on resume).

Model: d_model 512, 12 bidirectional Mamba-2 blocks (headdim 64, d_state 64), FiLM
conditioning, the posterior input (the stem also reads each position's posterior mean under the
output prior), tied head; ~33.2M parameters with the 8192-token BPE.
"""

from dimba_jax.config import default_config, use_shared_corpus


def get_config():
    c = default_config()
    c.task = "dimba"
    c.model.d_model = 512
    c.model.n_layers = 12
    c.model.d_state = 64
    c.model.headdim = 64
    c.model.chunk_size = 128
    c.model.time_embed_dim = 256
    c.model.compute_dtype = "bfloat16"
    c.model.ssd_impl = "auto"
    # At equal tokens the posterior input and learning rate 4e-3 took the judge perplexity at
    # T = 64 from 13.9x to 7.8x the AR model's (quality_small_opt_h100.md -> quality_small_post_h100.md).
    c.model.posterior_input = True
    use_shared_corpus(c)  # $DIMBA_DATA (default .gpu/data): source, val_source, bpe, token cache
    c.data.seq_len = 1024
    c.train.steps = 8000
    c.train.batch_size = 8
    c.train.lr = 4e-3
    c.train.warmup_steps = 400
    c.train.weight_decay = 0.1
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    c.train.sample_every = 1000
    c.train.eval_every = 1000
    c.train.eval_batches = 8
    c.sample.length = 1024
    c.sample.steps = 64
    # The output prior at weight 0.6, the score temperature from 1 to 0.9 over the steps: the
    # lowest judge perplexity of the sweep with sample entropy within 5% of real text's
    # (benchmarks/results/quality_small_post_h100.md).
    c.sample.prior_weight = 0.6
    c.sample.score_temperature = 1.0
    c.sample.score_temperature_final = 0.9
    return c
