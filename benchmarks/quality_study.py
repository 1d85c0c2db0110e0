"""The quality study: DIMBA levers and the model of record, trained at equal tokens on one GPU.

Each study trains its runs side by side on one device (one process each, sharing the GPU's
memory), then loads every run and measures, on the same held-out windows:
  * the likelihood: DIMBA's variational bound (`DimbaTask.nll_bound`, bits per token) beside the
    AR model's exact NLL;
  * where the denoiser learns: the head's cross-entropy and accuracy at log-SNR levels
    (`DimbaTask.eval_metrics`), plotted by `benchmarks.quality_report`;
  * context use: the head's accuracy on the 8 tokens after a clean 32-token prompt, with the
    prompt and with it noised like the rest (`DimbaTask.context_use`), and the AR model's
    accuracy at the same positions for scale;
  * samples: unprompted and prompted DDIM samples judged by an AR judge conditioned on the
    prompt (`dimba_jax.evaluate.harness`), with their entropy.

Studies (STUDIES below):
  ablation  configs/ablation.py (~6M parameters, 19.7M tokens): the paper's recipe, each lever
            alone on top of it, the combination without each of its parts; the AR model of the
            same size and tokens is the scale and the judge.
  width     configs/ablation.py at diffusion widths model.embed_dim 256 (= d_model), 64, 32, 16,
            each judged at score temperatures 0.5 (default), 0.7 and 1; the AR model as above.
  capacity  configs/ablation.py's default recipe at equal tokens with a larger denoiser
            (d_model 384; 12 blocks; d_state 128), learning rates 8e-3, 4e-3 and 1e-3, 2400 steps of
            32 windows, and the winners combined; sampled at score temperatures 0.8 and 0.6 and two prior-weight settings;
            the AR model as above.
  posterior configs/ablation.py with the posterior input (model.posterior_input) at the
            default recipe, at learning rate 4e-3 with 2400 x 32 windows and with 4800 x 16, each
            beside the same without it; the AR model as above, and the AR model at 4e-3 with
            4800 x 16 (same tokens) for scale; with the posterior input also 9600 x 8 at 4e-3
            and 2e-3, and 4800 x 16 at 6e-3. Chained calls on one machine, each training the
            runs its `--runs` names beside the judge the first trained (the study workdir stays
            on a warm machine); quality_posterior_{h200,b8_h100,lr_h100}.json hold those run.
  prompt    the prompted target's levers at ablation scale: the posterior input's best run
            (4e-3, 4800 x 16) sampled with and without a prompt at three samplers (the best, with
            fresh noise at every step, at prior weight 0.3) and with classifier-free guidance 1.5
            to 4; the AR model's prompted / unprompted ratio beside it. One call (~5 min):
                python -m benchmarks.quality_study --study prompt --data-dir .gpu/data \
                    --workdir runs/prompt --out $OUT/quality_prompt_$DEV.json --budget-s 560
  wavefront configs/ablation.py with per-position noise levels (diffusion/wavefront.py): the
            default recipe, the same with the per-position level embedding alone
            (model.position_levels), and trained with wavefronts up to W = 1 and W = 3; each
            sampled with one level (W = 0) and, where trained for it, at W = 1 and 3, at score
            temperatures 0.8 (the default) and 0.6; the AR model as above.
  tiny      configs/tiny.py and its AR model (6 causal blocks, the judge) on CPU, sampled at
            score temperature 1 (tiny's default), 0.8, 0.6 and two schedules (st1+stf0.6: 1 at
            the noisiest step down to 0.6 at the last; st0.6+stf1 the reverse).
  tiny_wavefront  configs/tiny.py with wavefronts (W <= 3) in both orders, sampled with one
            level and at W = 1 and 3 in their order; the tiny study's AR judge.
  tiny_noise  configs/tiny.py with the warp's floor raised to 1 and 4 (half / 80% of the
            training levels uniform in log-SNR); the tiny study's AR judge.
  tiny_lr   configs/tiny.py at equal tokens with learning rate 6e-3, with 680 steps of 12 windows,
            1360 of 6, 2720 of 3, and 680 of 12 at 6e-3; the tiny study's AR judge.
  tiny_vocab  configs/tiny.py with the 2048-id BPE at twice the steps (tiny's wall time), and
            with 6 blocks; its own AR judge on that tokenizer.
  tiny_input  configs/tiny.py with the posterior input (model.posterior_input) beside the
            recipe, at equal steps, at equal time (1200 steps), in place of
            self-conditioning, without gradients through it, and with a learned per-token logit
            bias; its own AR judge.
  tiny_head  configs/tiny.py with the head's GEMMs on bfloat16 operands (model.head_dtype)
            beside the recipe (float32) and the recipe at seed 1 (the scale of seed noise); its own
            AR judge.
  tiny_ar_head  the AR model of configs/tiny.py's width with its head's GEMMs on bfloat16 operands
            forward and backward (model.head_dtype "bfloat16", the default) beside "float32" and
            beside the default at seed 1; the first AR run judges.
  tiny_ctx  configs/tiny.py with four times the prefix layouts, and with the warp's floor at 1,
            beside the recipe, judged by the prompt fit and the context use by position; its own
            AR judge.
  small     configs/small.py at its earlier recipe (no posterior input, learning rate 2e-3),
            configs/ar_small.py on the same tokens and the judge (configs/judge.py); harness rows
            at T in {16, 32, 64, 128} into the Pareto results file (`--pareto`).
  small_post  configs/small.py's recipe of record: the small study with DIMBA at the ablation
            winners (the posterior input, learning rate 4e-3), the same AR model and judge (1500
            steps), the sweep cut to the output-prior settings near the 5% entropy line, and the
            prompted row at T = 64 also with classifier-free guidance 2. Three chained calls on
            one warm machine (~29 device minutes on an H100 with its start), the same command
            each time (its --out and workdir stay on the machine; copy --out to $OUT each time):
                python -m benchmarks.quality_study --study small_post --data-dir .gpu/data \
                    --workdir runs/sp --out runs/sp/q.json --pareto runs/sp/pareto.json \
                    --budget-s 570 --train-reserve-s 2
            The first trains until its budget; the second finishes training and measures what
            fits in the time left (a run only when its `measure_s` estimate does); the third
            measures the rest.

    python -m benchmarks.quality_study --study ablation --data-dir .gpu/data \\
        --workdir runs/ablation --out $OUT/quality_ablation_h200.json --budget-s 560

Rerunning resumes: finished runs are not retrained, measured runs are not re-measured. `--smoke`
runs the pipeline on CPU in about a minute (tiny models, embedded corpus).

The trained models can leave the GPU machine as one-file exports (dimba_jax/train/export.py,
bfloat16): `--export-dir $OUT` writes each DIMBA run of a configs/ablation.py study as NAME.npz
(its EMA weights, ~12 MiB) and the judge as judge.npz (its raw weights, ~11 MiB); one call
returns at most 8 files and 64 MiB, so export at most 4 DIMBA runs (`--runs`) with the judge.
Anywhere else, `--from-exports DIR` measures those files without training (the AR runs, not
exported, are skipped), e.g. sampler settings on CPU:

    python -m benchmarks.quality_study --study wavefront --from-exports exports/ --runs all,wf1 \\
        --data-dir .gpu/data --workdir runs/cpu --out runs/cpu/q.json --bound-levels 8 \\
        --variants 'st0.6,st0.7+stf1,st1+stf0.6'

(`--variants` replaces the study's unprompted sampler variants; see harness.variant_options.
`--prompted-variants` adds prompted rows at further settings, each with its prompt fit, e.g.
classifier-free guidance: `--prompted-variants cfg1.5,cfg2,cfg3`.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time


ABL_SHIFT = round(math.log(4.0 / 256), 2)  # per-token SNR 4 at the middle of the cosine, d = 256
PAPER = {"model.readout": "direct", "model.skip_logits": False, "diffusion.mse_weight": 1.0,
         "diffusion.noise_sampling": "uniform", "sample.grid": "uniform", "sample.clamp": True}
# Context use is measured at these levels; at -10 the positions after the prompt carry no signal
# of their own at any diffusion width, so accuracy there is the prompt's doing alone.
MIN_BOUND_LEVELS = 32  # fewer strata than this: the bound's estimate is not quoted (benchmarks.quality_report)
CONTEXT_LOGSNRS = (-10.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0)
ENTROPY_TOLERANCE = 0.05  # a sampler setting of record keeps the sample entropy within 5% of real text's
AR_ABL = {"task": "ar", "model.bidirectional": False, "model.n_layers": 9}

# What the studies on configs/ablation.py share: the AR model of the same size judges; each run
# measures itself in its process (the driver judges) and its rows carry the run's name.
ABL_STUDY = {"config": "configs/ablation.py", "judge": "ar", "steps": (32,), "lengths": (256,),
             "batches": (32,), "prompt_len": 32, "skip_tokens": 2000, "measure_in_worker": True,
             "variant_is_run": True}

# configs/ablation.py's tokens in twice the optimizer steps at half the batch
ABL_B32 = {"train.batch_size": 32, "train.steps": 2400, "train.warmup_steps": 200, "train.checkpoint_every": 2400}
# ... and in four times the steps at a quarter of the batch
ABL_B16 = {"train.batch_size": 16, "train.steps": 4800, "train.warmup_steps": 400, "train.checkpoint_every": 4800}
# ... and in eight times the steps at an eighth of the batch (warm-up as at 4800 x 16)
ABL_B8 = {"train.batch_size": 8, "train.steps": 9600, "train.warmup_steps": 400, "train.checkpoint_every": 4800}

# the prompt study's samplers: the ablation scale's best (the prior weight 0.6 with the score
# temperature 1 -> 0.8), the same with DDPM's variance (fresh noise at every step, eta 1), and a
# lower prior weight (what the network adds from context counts for more)
PROMPT_BASES = ("pw0.6+st1+stf0.8", "pw0.6+st1+stf0.8+eta1", "pw0.3+st1+stf0.8")

STUDIES = {
    "ablation": {
        "runs": {
            "paper": dict(PAPER),
            "paper+shift": dict(PAPER, **{"diffusion.logsnr_shift": ABL_SHIFT}),
            "paper+score_interp": dict(PAPER, **{"model.readout": "score_interp", "diffusion.mse_weight": 0.0,
                                                 "sample.clamp": False}),
            "paper+skip": dict(PAPER, **{"model.skip_logits": True}),
            "paper+warp": dict(PAPER, **{"diffusion.noise_sampling": "warp", "sample.grid": "warp"}),
            "all": {},
            "all-warp+shift": {"diffusion.noise_sampling": "uniform", "sample.grid": "uniform",
                               "diffusion.logsnr_shift": ABL_SHIFT},
            "all-skip": {"model.skip_logits": False},
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
    },
    "width": {
        "runs": {
            "e256": {},
            "e64": {"model.embed_dim": 64},
            "e32": {"model.embed_dim": 32},
            "e16": {"model.embed_dim": 16},
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
        "variants": ("st0.7", "st1"),  # further score temperatures, unprompted, besides the default
    },
    "capacity": {
        # configs/ablation.py's default recipe at equal tokens with a larger denoiser (wider,
        # deeper, a larger state), other learning rates and twice the optimizer steps at half
        # the batch: which training-side lever narrows the bound's gap to the AR model
        "runs": {
            "all": {},
            "d384": {"model.d_model": 384},
            "L12": {"model.n_layers": 12},
            "ds128": {"model.d_state": 128},
            "lr4e-3": {"train.lr": 4e-3},
            "lr1e-3": {"train.lr": 1e-3},
            "b32x2400": dict(ABL_B32),
            "lr8e-3": {"train.lr": 8e-3},
            "lr4e-3+b32x2400": dict(ABL_B32, **{"train.lr": 4e-3}),
            "d384+lr4e-3+b32x2400": dict(ABL_B32, **{"train.lr": 4e-3, "model.d_model": 384}),
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
        "variants": ("st0.6", "pw0.8+st0.9+stf0.6", "pw0.6+st1+stf0.8"),
    },
    "posterior": {
        # configs/ablation.py with the posterior input (model.posterior_input), at the default
        # recipe and at the capacity study's best optimisation (learning rate 4e-3, 2400 x 32),
        # each beside the same without it; the AR model as in the capacity study
        "runs": {
            "all": {},
            "post": {"model.posterior_input": True},
            "lr4e-3+b32x2400": dict(ABL_B32, **{"train.lr": 4e-3}),
            "lr4e-3+b32x2400+post": dict(ABL_B32, **{"train.lr": 4e-3, "model.posterior_input": True}),
            # optimisation pushed one step further: twice the steps again at half the batch,
            # with and without the posterior input, and the AR model given the same optimisation
            "lr4e-3+b16x4800": dict(ABL_B16, **{"train.lr": 4e-3}),
            "lr4e-3+b16x4800+post": dict(ABL_B16, **{"train.lr": 4e-3, "model.posterior_input": True}),
            "ar+lr4e-3+b16x4800": dict(AR_ABL, **ABL_B16, **{"train.lr": 4e-3}),
            # with the posterior input: twice the steps again, and the learning rate either side
            "lr4e-3+b8x9600+post": dict(ABL_B8, **{"train.lr": 4e-3, "model.posterior_input": True}),
            "lr2e-3+b8x9600+post": dict(ABL_B8, **{"train.lr": 2e-3, "train.warmup_steps": 200,
                                                   "train.checkpoint_every": 2400,
                                                   "model.posterior_input": True}),
            "lr6e-3+b16x4800+post": dict(ABL_B16, **{"train.lr": 6e-3, "model.posterior_input": True}),
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
        "variants": ("st0.6", "pw0.6+st1+stf0.8"),
    },
    "prompt": {
        # the prompted target's levers at ablation scale, on the posterior input's best run
        # (quality_posterior_*.md): each prompted sampler beside the same sampler unprompted
        # (guidance acts only with a prompt), the AR model's prompted / unprompted as the scale
        "runs": {
            "post": dict(ABL_B16, **{"train.lr": 4e-3, "model.posterior_input": True}),
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
        "variants": PROMPT_BASES,
        "prompted_variants": PROMPT_BASES + tuple(f"{PROMPT_BASES[0]}+cfg{g:g}" for g in (1.5, 2, 3, 4))
        + (f"{PROMPT_BASES[2]}+cfg2",),
    },
    "wavefront": {
        "runs": {
            "all": {"@variants": ("st0.6",)},
            "pos": {"model.position_levels": True, "@variants": ("st0.6",)},
            "wf1": {"model.position_levels": True, "diffusion.wavefront": 1.0,
                    "@variants": ("st0.6", "wf1", "wf1_st0.6")},
            "wf3": {"model.position_levels": True, "diffusion.wavefront": 3.0,
                    "@variants": ("st0.6", "wf1", "wf1_st0.6", "wf3", "wf3_st0.6")},
            "ar": dict(AR_ABL),
        },
        **ABL_STUDY,
    },
    "tiny": {
        # configs/tiny.py on CPU (two processes, ~10 min on 2 cores), judged by the AR model of
        # the same width and tokens: the CPU-sized check of samplers and of tiny's quality target
        "config": "configs/tiny.py",
        "runs": {
            "dimba": {},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8", "st0.6", "st1+stf0.6", "st0.6+stf1"),
    },
    "tiny_wavefront": {
        # configs/tiny.py trained with wavefronts up to W = 3 (half the examples), left to right
        # and in random order, beside the tiny study's AR judge (same --workdir: it is reused)
        "config": "configs/tiny.py",
        "runs": {
            "l2r": {"model.position_levels": True, "diffusion.wavefront": 3.0, "@variants": ("wf1", "wf3")},
            "rand": {"model.position_levels": True, "diffusion.wavefront": 3.0,
                     "diffusion.wavefront_order": "random",
                     "@variants": ("wf1+random_order", "wf3+random_order")},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
    },
    "tiny_noise": {
        # configs/tiny.py with more of its training levels spread evenly over log-SNR (the warp's
        # floor: 1 = half, 4 = 80% of the draws uniform over diffusion.logsnr_range), beside the
        # tiny study's AR judge (same --workdir: it is reused)
        "config": "configs/tiny.py",
        "runs": {
            "floor1": {"diffusion.warp_floor": 1.0},
            "floor4": {"diffusion.warp_floor": 4.0},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8", "st1+stf0.4"),
    },
    "tiny_lr": {
        # configs/tiny.py at equal tokens with a higher learning rate and with twice the
        # optimizer steps at half the batch (the capacity study's winners at ablation scale),
        # beside the tiny study's AR judge (same --workdir: it is reused)
        "config": "configs/tiny.py",
        "runs": {
            # 340 x 24 windows was configs/tiny.py's recipe when this study ran; 680 x 12 is now
            "lr6e-3": {"train.lr": 6e-3, "train.batch_size": 24, "train.steps": 340,
                       "train.warmup_steps": 40, "train.checkpoint_every": 170},
            "b12x680": {"train.batch_size": 12, "train.steps": 680, "train.warmup_steps": 80,
                        "train.checkpoint_every": 340},
            "b6x1360": {"train.batch_size": 6, "train.steps": 1360, "train.warmup_steps": 160,
                        "train.checkpoint_every": 680},
            "lr6e-3+b12x680": {"train.lr": 6e-3, "train.batch_size": 12, "train.steps": 680,
                               "train.warmup_steps": 80, "train.checkpoint_every": 340},
            # twice the steps again at half the batch (the lever that still paid at ablation scale
            # from 2400 x 32 to 4800 x 16, quality_posterior_h200.md)
            "b3x2720": {"train.batch_size": 3, "train.steps": 2720, "train.warmup_steps": 320,
                        "train.checkpoint_every": 1360},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8", "st0.6", "pw0.6+st1+stf0.8"),
    },
    "tiny_ctx": {
        # configs/tiny.py with training levers aimed at reading the prompt, judged by the prompt fit
        # and the context use by position: four times the prefix layouts, and the warp's floor
        # raised to 1 (half the training levels uniform in log-SNR, the noisy end included)
        "config": "configs/tiny.py",
        "runs": {
            "dimba": {},
            "prefix0.8": {"diffusion.layout_probs": (0.1, 0.8, 0.1)},
            "floor1": {"diffusion.warp_floor": 1.0},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True, "variants": (),
    },
    "tiny_vocab": {
        # configs/tiny.py with the packaged 2048-id BPE: the tied head and the output prior cost a
        # quarter, so tiny's five minutes hold twice the optimizer steps (2720 x 6 windows at
        # 83 ms per step instead of 1360 x 6 at 194 ms on 2 CPU cores); its own AR judge, on the
        # same tokenizer and tokens
        "config": "configs/tiny.py",
        "runs": {
            "v2k": {"data.tokenizer": "bpe_2048", "train.steps": 2720, "train.warmup_steps": 320,
                    "train.checkpoint_every": 1360},
            "v2k+L6": {"data.tokenizer": "bpe_2048", "train.steps": 2720, "train.warmup_steps": 320,
                       "train.checkpoint_every": 1360, "model.n_layers": 6},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6,
                   "data.tokenizer": "bpe_2048", "train.steps": 2720, "train.warmup_steps": 320,
                   "train.checkpoint_every": 1360},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8", "pw0.6+st1+stf0.8"),
    },
    "tiny_input": {
        # configs/tiny.py with the posterior input (model.posterior_input: the stem also reads
        # each position's posterior mean under the output prior alone), beside the recipe at
        # equal tokens; its own AR judge
        "config": "configs/tiny.py",
        "runs": {
            "dimba": {},
            "post": {"model.posterior_input": True},
            # the same wall time as the recipe: the posterior input costs 13% per step on 2 CPU
            # cores (228.6 vs 202.2 ms, train_throughput_tiny_post_cpu.md)
            "post_1200": {"model.posterior_input": True, "train.steps": 1200, "train.warmup_steps": 140,
                          "train.checkpoint_every": 600},
            # the posterior input in place of self-conditioning (whose pass costs ~11% per step)
            "post-sc": {"model.posterior_input": True, "model.self_condition": False},
            # the posterior channel as a constant of the input (no gradient through it): +14% per
            # step on 2 CPU cores instead of +33% (train_throughput_tiny_nograd_cpu.md)
            "post_nograd": {"model.posterior_input": True, "model.posterior_grad": False},
            # a learned per-token bias in the head: at the noisiest levels the recipe's head is
            # 0.075 bits/token worse than the unigram itself (docs/context_gain_tiny.png)
            "bias": {"model.logit_bias": True},
            "post+bias": {"model.posterior_input": True, "model.logit_bias": True},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8",),
    },
    "tiny_head": {
        # configs/tiny.py with the vocabulary-sized GEMMs (tied head, output prior, softmax @ E)
        # on bfloat16 operands (model.head_dtype; float32 accumulation) beside the recipe's
        # float32, and the recipe again at master seed 1 for the scale of seed noise; its own AR
        # judge
        "config": "configs/tiny.py",
        "runs": {
            "dimba": {},
            "bf16": {"model.head_dtype": "bfloat16"},
            "seed1": {"seed": 1},
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
        "variants": ("st0.8",),
    },
    "tiny_ar_head": {
        # the AR model of configs/tiny.py's width (6 causal blocks) with its head's GEMMs on
        # bfloat16 operands forward and backward (model.head_dtype, the default) beside float32
        # and beside the default at master seed 1 (the scale of seed noise); the first judges
        "config": "configs/tiny.py",
        "runs": {
            "ar": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6},
            "ar_f32": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6,
                       "model.head_dtype": "float32"},
            "ar_seed1": {"task": "ar", "model.bidirectional": False, "model.n_layers": 6,
                         "seed": 1},
        },
        "judge": "ar", "steps": (32,), "lengths": (64,), "batches": (32,), "prompt_len": 16,
        "skip_tokens": 0, "measure_in_worker": True, "variant_is_run": True,
    },
    "small": {
        "config": "configs/small.py",
        "runs": {
            # small's earlier recipe (quality_small_opt_h100.md): no posterior input, rate 2e-3
            "dimba": {"train.sample_every": 0, "train.eval_every": 0, "model.posterior_input": False,
                      "train.lr": 2e-3},
            "ar": {"@config": "configs/ar_small.py", "train.sample_every": 0, "train.eval_every": 0},
            "judge": {"@config": "configs/judge.py", "train.eval_every": 0},
        },
        "judge": "judge",
        "steps": (64, 16, 32, 128),
        "prompted_steps": (64, 16),
        # sampler settings tried at the headline T (unprompted) before the rows of record, which
        # use the one the judge scores best
        "sweep": (("ddim", "st0.7"), ("ddim", "st0.8"), ("ddpm", "st0.7"), ("ddim", "st1+stf0.5"),
                  ("ddim", "pw0.6+st1+stf0.8"), ("ddim", "pw0.7+st1+stf0.7"), ("ddim", "pw0.6+st1+stf0.9"),
                  ("ddim", "pw0.5+st1+stf0.8"), ("ddim", "pw0.7+st1+stf0.8"), ("ddim", "pw0.5+st1+stf0.9")),
        "lengths": (1024,),
        "batches": (1, 64),
        "prompt_len": 64,
        "skip_tokens": 2000,
        "measure_in_worker": False,  # measured after training, alone on the GPU (latencies of record)
        # seconds to measure each run; a run is measured only when the call has that much left
        # (on an H100 DIMBA with the ten-setting sweep took most of a 575 s call; AR with the
        # judge's loading fitted in a 145 s one)
        "measure_s": {"dimba": 500, "ar": 110},
        "variant_is_run": False,
    },
}


# the small study at the ablation scale's winners (quality_posterior_*.md): configs/small.py's
# recipe of record since quality_small_post_h100.md
STUDIES["small_post"] = dict(
    STUDIES["small"],
    runs=dict(STUDIES["small"]["runs"],
              dimba=dict(STUDIES["small"]["runs"]["dimba"], **{"model.posterior_input": True, "train.lr": 4e-3}),
              judge=dict(STUDIES["small"]["runs"]["judge"], **{"train.steps": 1500, "train.checkpoint_every": 1500})),
    sweep=(("ddim", "st1+stf0.5"), ("ddim", "pw0.6+st1+stf0.8"), ("ddim", "pw0.6+st1+stf0.9"),
           ("ddim", "pw0.5+st1+stf0.8"), ("ddim", "pw0.5+st1+stf0.9")),
    prompted_guidance=(2.0,),  # the prompted target's lever: classifier-free guidance at scale 2
    measure_s={"dimba": 450, "ar": 110},
)


def parse_sweep(text: str) -> tuple[tuple[str, str], ...]:
    """'ddim:st0.7,ddpm:st0.75' -> (("ddim", "st0.7"), ("ddpm", "st0.75")); a setting without a
    variant ('ddim') is the model's default. ValueError names an unknown sampler or variant."""
    from dimba_jax.evaluate import harness
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        sampler, _, variant = item.partition(":")
        if sampler not in harness.SAMPLERS:
            raise ValueError(f"--sweep: unknown sampler in {item!r} (samplers {harness.SAMPLERS})")
        try:
            harness.variant_options(variant)
        except ValueError as e:
            raise ValueError(f"--sweep: {e}") from None
        out.append((sampler, variant))
    return tuple(out)


def parse_variants(text: str) -> tuple[str, ...]:
    """'st0.7, st0.6+stf1' -> ("st0.7", "st0.6+stf1"); ValueError names an unknown variant."""
    from dimba_jax.evaluate import harness
    out = tuple(x.strip() for x in text.split(",") if x.strip())
    for v in out:
        try:
            harness.variant_options(v)
        except ValueError as e:
            raise ValueError(f"--variants: {e}") from None
    return out


def smoke_study(study: dict) -> dict:
    """The study shrunk for --smoke (CPU, tiny models, short samples)."""
    return dict(study, steps=(4,), prompted_steps=(4,), lengths=(16,), batches=(2,), prompt_len=8,
                skip_tokens=0, sweep=study.get("sweep", ())[:2])


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=sorted(STUDIES), required=True)
    p.add_argument("--runs", default="", help="comma-separated subset of the study's runs ('' = all)")
    p.add_argument("--workdir", required=True, help="folder holding one workdir per run")
    p.add_argument("--data-dir", default="", help="folder with train-*.jsonl.xz + validation.jsonl.xz")
    p.add_argument("--out", required=True, help="study results JSON (merged into when present)")
    p.add_argument("--pareto", default="", help="also merge the harness rows into this Pareto results JSON")
    p.add_argument("--budget-s", type=float, default=560.0, help="wall-time budget of the whole call")
    p.add_argument("--train-reserve-s", type=float, default=200.0, help="time kept for measuring after training")
    p.add_argument("--set", action="append", default=[], help="RUN:key=value override (repeatable)")
    p.add_argument("--mem-fraction", type=float, default=0.0, help="GPU memory share per training process (0 = 0.9 / runs)")
    p.add_argument("--bound-levels", type=int, default=128,
                   help="strata of the likelihood bound's integral (tables print bounds of fewer than "
                        f"{MIN_BOUND_LEVELS} as not an estimate: the integrand is peaked)")
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    p.add_argument("--train-only", action="store_true", help="train the runs, measure nothing")
    p.add_argument("--sweep", default="",
                   help="sampler settings to sweep, e.g. 'ddim:st0.7,ddpm:st0.75' ('' = the study's)")
    p.add_argument("--variants", default=None,
                   help="comma-separated unprompted sampling variants measured for every DIMBA run, "
                        "replacing the study's (harness.variant_options: 'st0.7,st0.6+stf1,wf1')")
    p.add_argument("--prompted-variants", default=None,
                   help="comma-separated prompted sampling variants measured for every DIMBA run (with "
                        "their prompt fit), replacing the study's, e.g. guidance: 'cfg2,cfg3'")
    p.add_argument("--pareto-only", action="store_true",
                   help="no device work: replace the rows of --pareto by those of the measured study in --out")
    p.add_argument("--export-dir", default="",
                   help="studies measured in workers: write each DIMBA run as NAME.npz and the judge as judge.npz here")
    p.add_argument("--from-exports", default="",
                   help="measure the NAME.npz / judge.npz files of this folder instead of training")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the judged samples (rows of another seed replace these in --out: use a new file)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: train + measure one run
    return p.parse_args(argv)


def run_overrides(name: str, study: dict, args) -> dict:
    """The run's entry in the study (with "@config" / "@variants") updated by --set NAME:key=value."""
    overrides = dict(study["runs"][name])
    for item in args.set:
        run, _, kv = item.partition(":")
        if run == name:
            k, _, v = kv.partition("=")
            overrides[k] = v
    return overrides


def config_args(name: str, study: dict, args) -> tuple[str, list[str]]:
    """(config file, CLI overrides) of one run (its "@variants", the sampler variants it is
    measured at besides the study's, are not overrides)."""
    overrides = run_overrides(name, study, args)
    config = overrides.pop("@config", study["config"])
    overrides.pop("@variants", None)
    if args.smoke:
        overrides.update({"data.source": "embedded", "data.val_source": "", "data.tokenizer": "bpe",
                          "data.token_cache_dir": "", "model.d_model": 32, "model.n_layers": 1,
                          "model.d_state": 8, "model.headdim": 16, "model.chunk_size": 16,
                          "model.time_embed_dim": 16, "model.compute_dtype": "float32",
                          "model.ssd_impl": "xla", "data.seq_len": 48, "train.steps": 6,
                          "train.batch_size": 4, "train.checkpoint_every": 6, "train.eval_batches": 1,
                          "sample.length": 16, "sample.num_samples": 1, "train.warmup_steps": 2})
    elif args.data_dir:
        overrides.update({"data.source": f"files:{args.data_dir}/train-*.jsonl.xz",
                          "data.val_source": f"files:{args.data_dir}/validation.jsonl.xz",
                          "data.token_cache_dir": f"{args.data_dir}/cache"})
    return config, [f"--config.{k}={v}" for k, v in overrides.items()]


def finished(workdir: str) -> bool:
    """True if the run's last checkpoint is at its configured step count."""
    try:
        from dimba_jax.train.checkpoint import load_config
        cfg = load_config(workdir)
        steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
        return bool(steps) and max(steps) >= int(cfg.train.steps)
    except (FileNotFoundError, OSError, ValueError):
        return False


def tokenize_once(study: dict, names: list[str], args) -> None:
    """Fills the shared token cache before the training processes start (one tokenisation)."""
    if args.smoke or not args.data_dir:
        return
    from dimba_jax.data.pipeline import load_or_tokenize
    from dimba_jax.data.sources import open_source
    from dimba_jax.data.tokenizers import get_tokenizer
    t0 = time.perf_counter()
    load_or_tokenize(open_source(f"files:{args.data_dir}/train-*.jsonl.xz", split="all"),
                     get_tokenizer("bpe"), cache_dir=f"{args.data_dir}/cache")
    log(f"token cache ready in {time.perf_counter() - t0:.0f}s")


def train_all(study: dict, names: list[str], args, deadline: float) -> dict:
    """Trains the unfinished runs at once, one process each; returns {name: seconds}."""
    in_worker = study["measure_in_worker"]
    todo = [n for n in names if not (os.path.isfile(measure_path(args, n)) if in_worker
                                     else finished(os.path.join(args.workdir, n)))]
    if not todo:
        return {}
    tokenize_once(study, todo, args)
    frac = args.mem_fraction or max(0.05, round(0.9 / len(todo), 3))
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(frac), PYTHONUNBUFFERED="1")
    limit = max(10.0, deadline - time.perf_counter() - args.train_reserve_s)
    procs = {}
    os.makedirs(args.workdir, exist_ok=True)
    for name in todo:
        if in_worker:
            cmd = [sys.executable, "-m", "benchmarks.quality_study", *sys_args(args), "--worker", name]
        else:
            config, overrides = config_args(name, study, args)
            cmd = [sys.executable, "-m", "dimba_jax.main", "--config", config,
                   "--workdir", os.path.join(args.workdir, name), *overrides]
        logf = open(os.path.join(args.workdir, f"{name}.log"), "a")
        log(f"train {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT), time.perf_counter(), logf)
    seconds, stopped = {}, set()
    while procs:
        for name, (proc, t0, logf) in list(procs.items()):
            if proc.poll() is not None:
                seconds[name] = time.perf_counter() - t0
                logf.close()
                log(f"train {name}: exit {proc.returncode} after {seconds[name]:.0f}s")
                del procs[name]
            elif (time.perf_counter() - t0 > limit and name not in stopped
                  and not (in_worker and finished(os.path.join(args.workdir, name)))):
                proc.terminate()  # the trainer checkpoints on SIGTERM, then the worker measures
                stopped.add(name)
                log(f"train {name}: stopped at the time limit ({limit:.0f}s)")
        time.sleep(2.0)
    return seconds


def too_little_time(study: dict, name: str, left_s: float) -> str:
    """Why run `name` is not measured with `left_s` seconds of the call's budget left (its
    measurement takes about study["measure_s"][name] seconds, 30 when the study gives no
    estimate), or "" when it fits."""
    need = float(study.get("measure_s", {}).get(name, 30.0))
    if left_s >= need:
        return ""
    return (f"{name} not measured: {max(left_s, 0.0):.0f}s of the budget left, its measurement "
            f"takes about {need:.0f}s (the study's measure_s; results' measure_seconds has past ones)")


def measure_path(args, name: str) -> str:
    return os.path.join(args.workdir, f"{name}.measure.json")


def sys_args(args) -> list[str]:
    """The driver's own arguments, for its worker processes."""
    out = ["--study", args.study, "--workdir", args.workdir, "--out", args.out,
           "--bound-levels", str(args.bound_levels), "--eval-batches", str(args.eval_batches)]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    if args.smoke:
        out.append("--smoke")
    if args.export_dir:
        out += ["--export-dir", args.export_dir]
    if args.variants is not None:
        out += ["--variants", args.variants]
    if args.prompted_variants is not None:
        out += ["--prompted-variants", args.prompted_variants]
    if args.sweep:
        out += ["--sweep", args.sweep]
    if args.seed:
        out += ["--seed", str(args.seed)]
    for item in args.set:
        out += ["--set", item]
    return out


def study_from_args(args) -> dict:
    """The study as the driver and its workers measure it: STUDIES[--study] (shrunk with --smoke),
    with --sweep, --variants, --prompted-variants and --seed applied."""
    study = smoke_study(STUDIES[args.study]) if args.smoke else STUDIES[args.study]
    if args.sweep:
        study = dict(study, sweep=parse_sweep(args.sweep))
    if args.variants is not None:
        study = dict(study, variants=parse_variants(args.variants))
    if args.prompted_variants is not None:
        study = dict(study, prompted_variants=parse_variants(args.prompted_variants))
    if args.seed:
        study = dict(study, seed=args.seed)
    return study


def run_worker(args) -> None:
    """One run in its own process: train it (the CLI), then measure it without a judge, samples
    kept as text, into `<workdir>/<run>.measure.json` (the driver judges them)."""
    from dimba_jax import main as cli

    study = study_from_args(args)
    name = args.worker
    workdir = os.path.join(args.workdir, name)
    if not finished(workdir):
        config, overrides = config_args(name, study, args)
        code = cli.main(["--config", config, "--workdir", workdir, *overrides])
        if code != 0:
            raise SystemExit(code)
    res = {"rows": []}
    measure(name, study, args, None, validation_texts(args), res, "", "")
    with open(measure_path(args, name), "w") as f:
        json.dump(res, f)
    if args.export_dir:
        export_weights(name, study, args)


def export_weights(name: str, study: dict, args) -> None:
    """One-file exports of a trained run: NAME.npz (EMA) for a DIMBA run, judge.npz (raw weights)
    for the study's judge."""
    from dimba_jax.train.inference import export_run, load_run

    os.makedirs(args.export_dir, exist_ok=True)
    workdir = os.path.join(args.workdir, name)
    if name == study["judge"]:
        log(f"exported {export_run(load_run(workdir, prefer_ema=False), os.path.join(args.export_dir, 'judge.npz'))}")
    run = load_run(workdir)
    if run.config.task == "dimba":
        log(f"exported {export_run(run, os.path.join(args.export_dir, f'{name}.npz'))}")


def model_source(args, name: str) -> str:
    """Where run `name`'s weights are read from: its workdir, or with --from-exports its file."""
    if args.from_exports:
        return os.path.join(args.from_exports, "judge.npz" if name == "@judge" else f"{name}.npz")
    return os.path.join(args.workdir, name)


def validation_texts(args) -> list[str]:
    """The validation books (each cut to 60k characters), where prompts and references come from."""
    from dimba_jax.data.sources import open_source
    spec = "embedded" if args.smoke or not args.data_dir else f"files:{args.data_dir}/validation.jsonl.xz"
    src = open_source(spec, split="validation" if spec == "embedded" else "all")
    return [src[i][:60_000] for i in range(min(len(src), 64))]


def judge_samples(res: dict, judge) -> None:
    """Fills judge_ppl / entropy of a worker's rows from its kept sample texts ("prompt || text"),
    and the prompt fit of its prompted rows into its run's "prompt_fit"."""
    from dimba_jax.evaluate import results as results_lib
    (info,) = res["runs"].values()
    for row in res["rows"]:
        texts = res.get("all_samples", {}).get(results_lib.row_key(dict(row, batch=0)))
        if not texts:
            continue
        if row["prompted"]:
            pairs = [t.split(" || ", 1) for t in texts]
            score = judge.score_texts([p[1] for p in pairs], [p[0] for p in pairs])
            if len(pairs) > 1:
                info.setdefault("prompt_fit", {})[results_lib.row_key(row)] = judge.prompt_fit(
                    [p[1] for p in pairs], [p[0] for p in pairs])
        else:
            score = judge.score_texts(texts)
        row.update(judge_ppl=score["ppl"], entropy=score["entropy"])


def ar_measures(task, model, batches, prompt_len: int, positions: int = 8) -> dict:
    """The AR model's exact NLL (bits/token, teacher forcing) and next-token accuracy at
    positions prompt_len .. prompt_len + positions - 1 of the same windows (their mean, and each
    position's)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    loss_fn = nnx.jit(task.loss)
    logits_fn = nnx.jit(lambda m, t: m(t))
    nll, correct = [], []
    for i, batch in enumerate(batches):
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        _, metrics = loss_fn(model, {"tokens": tokens}, jax.random.key(i))
        nll.append(float(metrics["ce"]))
        logits = logits_fn(model, tokens)  # (b, L, V): position j predicts token j + 1
        pred = np.asarray(jnp.argmax(logits[:, prompt_len - 1:prompt_len - 1 + positions], -1))
        correct.append(np.mean(pred == np.asarray(tokens[:, prompt_len:prompt_len + positions]), 0))
    return {"nll_bits": float(np.mean(nll)) / math.log(2.0), "acc_after_prompt": float(np.mean(correct)),
            "acc_after_prompt_by_position": np.mean(correct, 0).tolist()}


def choose_setting(rows: list[dict], real_entropy: float, tolerance: float = ENTROPY_TOLERANCE) -> dict:
    """The judged row of record among a sweep's rows: the lowest judge perplexity among those
    whose sample entropy is within `tolerance` (relative) of real text's, else the lowest overall
    (a NaN perplexity never wins)."""
    ppl = lambda r: r["judge_ppl"] if r.get("judge_ppl") == r.get("judge_ppl") and r.get("judge_ppl") is not None else float("inf")
    close = [r for r in rows if r.get("entropy") is not None
             and abs(r["entropy"] / real_entropy - 1.0) <= tolerance]
    return min(close or rows, key=ppl)


def sweep(gen, study: dict, judge, val_texts, workdir: str, command: str, device: str, info: dict):
    """Judges the study's sampler settings at its headline T (unprompted, the largest batch);
    returns the (sampler, variant) with the lowest judge perplexity among those whose sample
    entropy is within ENTROPY_TOLERANCE of real text's (the lowest overall when none is), and
    records all in info."""
    from dimba_jax.evaluate import harness
    L, T = study["lengths"][0], study["steps"][0]
    specs = [harness.RunSpec("dimba", smp, T, L, False, v) for smp, v in study["sweep"]]
    opts = harness.HarnessOptions(batches=(max(study["batches"]),), prompt_len=study["prompt_len"],
                                  skip_tokens=study["skip_tokens"], seed=study.get("seed", 0), overwrite=True)
    out = harness.run_harness({"dimba": gen}, judge, specs, val_texts, os.path.join(workdir, "sweep.json"),
                              options=opts, command=command, device=device, log=log)
    info["sweep"] = [{k: r.get(k) for k in ("sampler", "variant", "steps", "judge_ppl", "entropy")}
                     for r in out["rows"]]
    ref: dict = {}
    harness.ensure_reference(ref, judge, val_texts, L, max(study["batches"]), study["skip_tokens"], L)
    real = ref["reference_by_L"][str(L)]["entropy"]
    best = choose_setting(out["rows"], real)
    log(f"sampler sweep: best {best['sampler']} {best.get('variant', '') or 'default'} "
        f"(judge ppl {best['judge_ppl']:.1f})")
    return best["sampler"], best.get("variant", "")


def record_specs(study: dict, sampler: str, variant: str) -> list:
    """The rows of record of a DIMBA run at the sweep's chosen (sampler, variant): unprompted at
    every T of the study (its headline T first), prompted at its `prompted_steps`, and prompted
    at the headline T with each classifier-free guidance scale of `prompted_guidance` added to
    the chosen variant ("<variant>+cfg<scale>")."""
    from dimba_jax.evaluate import harness
    headline = study["steps"][0]
    specs = [harness.RunSpec("dimba", sampler, t, L, p, variant)
             for L in study["lengths"] for p in (False, True)
             for t in ((headline,) + tuple(x for x in study["steps"] if x != headline)
                       if not p else study.get("prompted_steps", study["steps"][:1]))]
    specs += [harness.RunSpec("dimba", sampler, headline, L, True,
                              "+".join(x for x in (variant, f"cfg{g:g}") if x))
              for L in study["lengths"] for g in study.get("prompted_guidance", ())]
    return specs


def measure(name: str, study: dict, args, judge, val_texts, res: dict, command: str, device: str) -> None:
    """All measurements of one trained run into res["runs"][name] and res["rows"]."""
    import numpy as np

    from dimba_jax.data.pipeline import make_eval_batches, unigram_log_prior
    from dimba_jax.evaluate import harness
    from dimba_jax.evaluate import results as results_lib
    from dimba_jax.evaluate.generators import ArGenerator, DimbaGenerator
    from dimba_jax.evaluate.loading import count_params
    from dimba_jax.train.inference import load_run

    workdir = model_source(args, name)
    run = load_run(workdir)
    model, task, cfg, tok, step = run.model, run.task, run.config, run.task.tokenizer, run.step
    seq = int(cfg.data.seq_len)
    batch = 4 if args.smoke else 32
    batches = make_eval_batches(cfg.data, tok, batch, args.eval_batches, seq)
    info = {"workdir": workdir, "step": step, "params": count_params(model), "task": cfg.task,
            "tokens_seen": step * int(cfg.train.batch_size) * seq,
            "overrides": run_overrides(name, study, args)}
    prompt_len = study["prompt_len"]
    if cfg.task == "dimba":
        curves = [task.eval_metrics(model, b, logsnrs=tuple(float(v) for v in np.arange(-15.0, 5.5, 1.0)))
                  for b in batches]
        info["noise_curve"] = {k: float(np.mean([c[k] for c in curves])) for k in curves[0]}
        bounds = [task.nll_bound(model, b, levels=args.bound_levels) for b in batches]
        info["bound"] = dict({k: float(np.mean([x[k] for x in bounds])) for k in bounds[0]},
                             levels=int(args.bound_levels))
        log_prior = unigram_log_prior(cfg.data, tok)
        ref = [task.unigram_bound(model, b, log_prior, levels=args.bound_levels) for b in batches]
        info["unigram_bound"] = dict({k: float(np.mean([x[k] for x in ref])) for k in ref[0]},
                                     levels=int(args.bound_levels))
        per = task.context_use_by_position(model, batches, prompt_len=min(32, seq // 2), logsnrs=CONTEXT_LOGSNRS)
        info["context"], info["context_by_position"] = {}, {}
        for lam, (with_p, without) in per.items():
            info["context"].update({f"acc_prompt_lam{lam:g}": float(with_p.mean()),
                                    f"acc_noprompt_lam{lam:g}": float(without.mean())})
            info["context_by_position"][f"{lam:g}"] = {"prompt": with_p.tolist(), "noprompt": without.tolist()}
        nll_bits = info["bound"]["bound_bits"]
        gen = DimbaGenerator(model, cfg, tok)
        specs = harness.plan(models=("dimba",), samplers=("ddim",), steps=study["steps"],
                             lengths=study["lengths"], prompted=(False, True),
                             headline_steps=study["steps"][0])
        if study.get("sweep") and judge is not None:
            scratch = os.path.join(args.workdir, name)  # the run's folder (also with --from-exports)
            os.makedirs(scratch, exist_ok=True)
            sampler, variant = sweep(gen, study, judge, val_texts, scratch, command, device, info)
            specs = record_specs(study, sampler, variant)
        variants = study.get("variants", ()) + tuple(study["runs"][name].get("@variants", ()))
        specs += [harness.RunSpec("dimba", "ddim", study["steps"][0], L, False, v)
                  for L in study["lengths"] for v in variants]
        specs += [harness.RunSpec("dimba", "ddim", study["steps"][0], L, True, v)
                  for L in study["lengths"] for v in study.get("prompted_variants", ())]
    else:
        info.update(ar_measures(task, model, batches, min(32, seq // 2)))
        nll_bits = info["nll_bits"]
        gen = ArGenerator.from_config(model, cfg, tok)
        specs = harness.plan(models=("ar",), lengths=study["lengths"], prompted=(False, True))
    log(f"measured {name}: {json.dumps({k: v for k, v in info.items() if k in ('bound', 'nll_bits')})}")
    tmp = os.path.join(args.workdir, f"{name}.harness.json")
    if os.path.exists(tmp):
        os.remove(tmp)  # rows of an earlier measurement of this run must not join this one's
    opts = harness.HarnessOptions(batches=study["batches"], prompt_len=prompt_len,
                                  skip_tokens=study["skip_tokens"], samples_to_keep=max(study["batches"]),
                                  seed=study.get("seed", 0), overwrite=True)
    out = harness.run_harness({cfg.task: gen}, judge, specs, val_texts, tmp, options=opts,
                              command=command, device=device, log=log)
    res["all_samples"] = dict(out.get("samples", {}))
    info["prompt_fit"] = {k: {f: v[f] for f in ("fit_ppl_own", "fit_ppl_other", "fit_tokens")}
                          for k, v in out.get("details", {}).items() if "fit_ppl_own" in v}
    rows = [dict(row, nll_bits=nll_bits) for row in out["rows"]]
    res["rows"] = rows
    res["runs"] = {name: info}


def to_pareto(res: dict, pareto: dict, command: str) -> dict:
    """The Pareto results file of the study's models: its rows, reference, samples and models
    replace those of `pareto` (rows of an earlier checkpoint must not mix with these); what does
    not depend on the weights (the long-context timing study) is kept."""
    out = dict(pareto, rows=list(res["rows"]), reference=res.get("reference"),
               reference_by_L=res.get("reference_by_L", {}), samples=dict(res.get("samples", {})),
               device=res.get("device", pareto.get("device", "")),
               commands=list(res.get("commands", [])) + ([command] if command else []),
               models={name: {k: v for k, v in info.items() if k != "noise_curve"}
                       for name, info in res.get("runs", {}).items()},
               details={}, notes=[n for n in pareto.get("notes", []) if n.startswith("long_context")])
    out["command"] = " ; ".join(out["commands"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    if args.pareto_only:
        from dimba_jax.evaluate import results as results_lib
        if not args.pareto:
            raise SystemExit("--pareto-only needs --pareto FILE")
        command = "python -m benchmarks.quality_study " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        pareto = to_pareto(results_lib.load(args.out), results_lib.load(args.pareto), command)
        results_lib.save(pareto, args.pareto)
        log(f"{len(pareto['rows'])} rows into {args.pareto}")
        return pareto
    deadline = time.perf_counter() + args.budget_s
    study = study_from_args(args)
    names = [n for n in (args.runs.split(",") if args.runs else study["runs"]) if n]
    command = "python -m benchmarks.quality_study " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    seconds = {} if args.from_exports else train_all(study, names, args, deadline)
    if args.train_only:
        log(f"trained: {seconds}")
        return {}
    if (not study["measure_in_worker"] and not args.from_exports
            and not finished(os.path.join(args.workdir, study["judge"]))):
        log(f"the judge ({study['judge']}) is not trained to its steps yet: nothing measured "
            "(rerun to continue)")
        return {}

    from dimba_jax.evaluate import harness
    from dimba_jax.evaluate import judge as judge_lib
    from dimba_jax.evaluate import results as results_lib
    from dimba_jax.train.inference import load_run

    device = results_lib.device_label()
    res = results_lib.load(args.out)
    res["study"] = args.study
    results_lib.add_command(res, command, device)
    res.setdefault("train_seconds", {}).update(seconds)
    jname = study["judge"]
    jrun = (load_run(model_source(args, "@judge")) if args.from_exports
            else load_run(os.path.join(args.workdir, jname), prefer_ema=False))
    jmodel, jcfg, jtok = jrun.model, jrun.config, jrun.task.tokenizer
    window = int(jcfg.data.seq_len)
    judge = judge_lib.Judge(jmodel, jtok, window=window, stride=max(1, window // 2), batch_size=16)
    res["models"] = dict(res.get("models", {}), judge={"workdir": (model_source(args, "@judge") if args.from_exports
                                                                   else os.path.join(args.workdir, jname)),
                                                       "window": window})
    val_texts = validation_texts(args)
    for L in study["lengths"]:
        harness.ensure_reference(res, judge, val_texts, L, max(study["batches"]), study["skip_tokens"],
                                 max(study["lengths"]), study["prompt_len"])
    for name in names:
        if study["runs"][name].get("@config") == "configs/judge.py":
            continue  # the judge scores; it is not a row
        if name in res.get("runs", {}):
            continue
        if args.from_exports and not os.path.isfile(model_source(args, name)):
            log(f"{name}: no {model_source(args, name)} (only DIMBA runs are exported); skipped")
            continue
        if study["measure_in_worker"] and not args.from_exports:
            if not os.path.isfile(measure_path(args, name)):
                log(f"{name}: no measurements (its worker failed; see {args.workdir}/{name}.log)")
                continue
            with open(measure_path(args, name)) as f:
                one = json.load(f)
            judge_samples(one, judge)
        else:
            if not args.from_exports and not finished(os.path.join(args.workdir, name)):
                log(f"{name} not measured: not trained to its configured steps yet (rerun to continue)")
                continue
            short = too_little_time(study, name, deadline - time.perf_counter())
            if short:
                log(short)
                continue
            one, t0 = {"rows": []}, time.perf_counter()
            measure(name, study, args, judge, val_texts, one, command, device)
            res.setdefault("measure_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        rows = [dict(r, variant="/".join(x for x in (name, r.get("variant", "")) if x))
                if study["variant_is_run"] else r for r in one["rows"]]
        results_lib.merge_rows(res, rows)
        res.setdefault("runs", {})[name] = one["runs"][name]
        res.setdefault("samples", {}).update({f"{name}|{k}": v[:5] for k, v in one["all_samples"].items()})
        results_lib.save(res, args.out)
        log(f"{name}: " + "; ".join(f"T={r['steps']} prompted={r['prompted']} ppl={r['judge_ppl']} H={r['entropy']}"
                                    for r in rows if r.get("judge_ppl") is not None))
    if args.pareto:
        results_lib.save(to_pareto(res, results_lib.load(args.pareto), ""), args.pareto)
    results_lib.save(res, args.out)
    log(f"done; results in {args.out}")
    return res


if __name__ == "__main__":
    main()
