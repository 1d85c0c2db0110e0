"""tiny: DIMBA on 2 CPU cores in about 5 minutes, then English-like byte-level samples.

Launch manual
-------------
  python -m dimba_jax.main --config configs/tiny.py --workdir runs/tiny
  python -m dimba_jax.main --workdir runs/tiny --mode sample --prompt "The old man" --steps 32
  python -m dimba_jax.main --workdir runs/tiny --mode eval
  tensorboard --logdir runs/tiny          # or read runs/tiny/metrics.jsonl

Data: the corpus embedded in the package (public-domain books), byte tokenizer (no files).
Model: d_model 128, 4 bidirectional Mamba-2 blocks (headdim 32, d_state 16), FiLM conditioning,
self-conditioning, tied head: 0.76M parameters, float32.
Budget: 450 steps x 24 windows x 128 bytes = 1.4M tokens. On 2 CPU cores a step takes about
0.55 s, plus ~20 s of compilation; our measured run of 500 steps took 5.1 minutes for the whole
command (training, final samples and evaluation) on a shared 2-core machine, so 450 steps leave a
margin. Samples are written to runs/tiny/samples.txt. At this budget they are English-like in
texture (spaces, punctuation, line breaks, short real words such as "the", "and", "to the",
"him") but mostly not real words: train longer (--config.train.steps=3000) or use
configs/small.py on a GPU for real sentences.
Rerunning the command resumes from the latest checkpoint (raise train.steps to continue).
Smoke test: --config.train.steps=20. Several processes: launch/local.sh 2 --config configs/tiny.py ...
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
    c.model.compute_dtype = "float32"
    c.data.source = "embedded"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.train.steps = 450
    c.train.batch_size = 24
    c.train.lr = 3e-3
    c.train.warmup_steps = 40
    c.train.checkpoint_every = 150
    c.train.log_every = 20
    c.train.sample_every = 0
    c.train.eval_batches = 2
    c.sample.length = 128
    c.sample.steps = 32
    c.sample.num_samples = 4
    return c
