"""base: a ~131M-parameter DIMBA (d_model 768, 24 blocks) at sequence length 1024, bf16, GPU.

The size of mamba_ssm's "130M" Mamba-2 (d 768, 24 layers), so throughput and MFU compare with
the reference figures of docs/ssd_reference.md (bidirectional: two mixers per block).

Launch manual
-------------
Data as in configs/small.py (`$DIMBA_DATA`, default `.gpu/data`, holding the Gutenberg shards).
    python -m dimba_jax.main --config configs/base.py --workdir runs/base
Throughput / MFU (no data needed, synthetic tokens):
    python -m benchmarks.train_throughput --config configs/base.py --steps 20 --out benchmarks/results/throughput_h200
Multi-GPU, one host: automatic (data axis = all GPUs); FSDP: --config.mesh.fsdp=4 --config.mesh.data=1 (the parameters then stay a tree).
Multi-host: launch/slurm_gpu.sbatch or launch/tpu_pod.sh.
Global batch 32 x 1024 tokens per step; raise it with --config.train.batch_size (and scale lr).

Built on configs/small.py (same corpus, tokenizer, sequence length, dtype and sampling); only what
differs is set here. Without the posterior input: its throughput records were measured without it
(at small it costs 3-5% per step).
"""

from dimba_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "small")  # same data, tokenizer, seq_len, dtype and sampling
    c.model.d_model = 768
    c.model.n_layers = 24
    c.model.d_state = 128
    c.model.chunk_size = 256
    c.model.posterior_input = False
    # The Mosaic GPU conv kernels (Hopper; the Triton ones elsewhere): one H100, one call, the
    # step 96.3 against 100.9 ms, compiled in 51 against 58 s (train_throughput_jit_core_h100.md).
    c.model.conv_forward = "mosaic"
    c.model.conv_backward = "mosaic"
    # The stem and out_proj GEMMs in bf16 (float32 sums): one H100, same calls, batch-1 sampler
    # T = 64 117.22 against 118.01 ms, train step 87.4 against 88.2 ms
    # (benchmarks/results/latency_levers_io_h100.md, train_throughput_io_h100.md). Quality not
    # measured: the same rounding in the head (model.head_dtype) measured none on configs/tiny.py.
    c.model.io_dtype = "bfloat16"
    # Params, moments and EMA as flat vectors where the mesh shards no parameter (FSDP or
    # tensor meshes keep the tree), the EMA on every 4th step: one H100, one process, the step
    # 85.8 ms as a tree, 85.3 flat, 84.6 flat + ema_every 4, lower in each of the three
    # windows; the AR base step 48.0 against 47.4 flat
    # (benchmarks/results/train_throughput_flat2_h100.md, train_throughput_arflat2_h100.md).
    c.train.param_layout = "auto"
    c.train.ema_every = 4
    c.train.steps = 20000
    c.train.batch_size = 32
    c.train.lr = 6e-4
    c.train.warmup_steps = 1000
    c.train.sample_every = 2000
    c.train.eval_every = 2000
    return c
