"""tiny: DIMBA on 2 CPU cores in under 5 minutes, then samples of real words (not yet sentences).

Launch manual
-------------
  python -m dimba_jax.main --config configs/tiny.py --workdir runs/tiny
  python -m dimba_jax.main --workdir runs/tiny --mode sample --prompt "The old man" --steps 32
  python -m dimba_jax.main --workdir runs/tiny --mode eval
  tensorboard --logdir runs/tiny          # or read runs/tiny/metrics.jsonl

Data: the corpus embedded in the package (public-domain books) and the BPE-8k tokenizer that
ships inside the package (no files needed).
Model: d_model 128, 4 bidirectional Mamba-2 blocks (headdim 32, d_state 16), FiLM conditioning,
self-conditioning, the posterior input without gradients through it (model.posterior_input,
model.posterior_grad: below), tied head: 1.79M parameters (1.05M of them the 8192 x 128
embedding), float32.
Budget: 1360 steps x 6 windows x 64 tokens = 0.52M tokens (~2 MB of text). Measured on an idle
2-core machine (jax 0.10.2 CPU): the whole command (tokenising, compiling, 1360 steps, final
samples and evaluation) took 4 min 42 s, against 4 min 38 s without the posterior input, the same
hour (175 vs 165 ms per step: benchmarks/results/train_throughput_tiny_nograd_cpu.md). More optimizer steps at a
smaller batch cost no time per token here and sample better at equal entropy: judge perplexity
2539 (340 x 24), 2245 (680 x 12), 1896 (1360 x 6) at -3 to -4% of real text's entropy
(benchmarks/results/quality_tiny_lr_cpu.md; the capacity study's lever at ablation scale).
At this budget the samples are still word soup: real words and punctuation, little
grammar. Samples use a score temperature falling from 0.9 to 0.5 over the steps (the comment
at config.sample.score_temperature says why); a constant 0.5 collapses this undertrained model
onto commas, newlines and "the". Measured against the AR model of the same width and tokens:
`python -m benchmarks.quality_study --study tiny` (~10 min on 2 cores).
Why BPE and not bytes: with the byte tokenizer the same budget (1.4M bytes) gave letter soup
("he med no the wil er wivopt ther dadn"): a diffusion model denoises all positions at once, so
it must learn spelling jointly across positions. With BPE every position decodes to a real word
or word piece, so the same five minutes give word soup with spaces and punctuation instead:
"for, her this, of." and to had was and them not on of whispered this that" (see README). Use
--config.data.tokenizer=byte --config.data.seq_len=128 to compare. For real sentences train
longer (--config.train.steps=3000) or use configs/small.py on a GPU.
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
    # The stem also reads each position's posterior mean under the output prior, as a constant of
    # the input (no gradient through it): judge perplexity 1910 -> 1637 at -4% of real entropy,
    # bound 10.93 -> 10.89 bits (training seed 1; benchmarks/results/quality_tiny_input_nograd_cpu.md
    # beside quality_tiny_input_s1_cpu.md). With gradients it samples better (1548) but costs 31%
    # per step instead of 6%, which 5 minutes do not hold.
    c.model.posterior_input = True
    c.model.posterior_grad = False
    c.data.source = "embedded"
    c.data.tokenizer = "bpe"
    c.data.seq_len = 64
    c.train.steps = 1360
    c.train.batch_size = 6
    c.train.lr = 3e-3
    c.train.warmup_steps = 160
    c.train.checkpoint_every = 680
    c.train.log_every = 20
    c.train.sample_every = 0
    c.train.eval_batches = 2
    c.sample.length = 64
    c.sample.steps = 32
    # No clamping at this scale: with it, 59% of the sampled words are corpus words and one word
    # piece ("absor", the row closest to the mean of the table) fills the gaps; without it, 92%
    # (8 samples x 64 tokens, T = 32; docs/small_run/README.md, "read-out quirk").
    c.sample.clamp = False
    # DDIM with the output prior at weight 0.6 and the score temperature falling from 1 at the
    # noisiest step to 0.8 at the last: of the settings measured on this recipe
    # (benchmarks/results/quality_tiny_lr_cpu.md, run b6x1360), the lowest judge perplexity with
    # the sample entropy within 5% of real text's (1754 at -4%; 0.9 -> 0.5 without the prior
    # weight: 1896 at -3%). A constant 0.5 collapses this model onto commas, newlines and "the".
    c.sample.prior_weight = 0.6
    c.sample.score_temperature = 1.0
    c.sample.score_temperature_final = 0.8
    c.sample.num_samples = 4
    return c
