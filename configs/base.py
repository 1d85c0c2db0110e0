"""base: a ~131M-parameter DIMBA (d_model 768, 24 blocks) at sequence length 1024, bf16, GPU.

The size of mamba_ssm's "130M" Mamba-2 (d 768, 24 layers), so throughput and MFU compare with
the reference figures of docs/ssd_reference.md (bidirectional: two mixers per block).

Launch manual
-------------
Data as in configs/small.py (`$DIMBA_DATA`, default `.gpu/data`, holding the Gutenberg shards).
    python -m dimba_jax.main --config configs/base.py --workdir runs/base
Throughput / MFU (no data needed, synthetic tokens):
    python -m benchmarks.train_throughput --config configs/base.py --steps 20 --out benchmarks/results/throughput_h200
Multi-GPU, one host: automatic (data axis = all GPUs); FSDP: --config.mesh.fsdp=4 --config.mesh.data=1.
Multi-host: launch/slurm_gpu.sbatch or launch/tpu_pod.sh.
Global batch 32 x 1024 tokens per step; raise it with --config.train.batch_size (and scale lr).
"""

from dimba_jax.config import default_config, use_shared_corpus


def get_config():
    c = default_config()
    c.task = "dimba"
    c.model.d_model = 768
    c.model.n_layers = 24
    c.model.d_state = 128
    c.model.headdim = 64
    c.model.chunk_size = 256
    c.model.time_embed_dim = 256
    c.model.compute_dtype = "bfloat16"
    c.model.ssd_impl = "auto"
    use_shared_corpus(c)  # $DIMBA_DATA (default .gpu/data): source, val_source, bpe, token cache
    c.data.seq_len = 1024
    c.train.steps = 20000
    c.train.batch_size = 32
    c.train.lr = 6e-4
    c.train.warmup_steps = 1000
    c.train.weight_decay = 0.1
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    c.train.sample_every = 2000
    c.train.eval_every = 2000
    c.train.eval_batches = 8
    c.sample.length = 1024
    c.sample.steps = 64
    return c
