"""The one place every config field is defined and documented.

`configs/*.py` files start from `default_config()` and override what differs; the comment on
each field here is its documentation. Unknown keys are an error (the ConfigDict is locked).
"""

from __future__ import annotations

import os

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Returns the full, locked default configuration (every field documented inline)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Master seed: parameters, data order, noise and sampling all derive from it.
    c.task = "dimba"  # What to train: "dimba" (the diffusion denoiser) or "ar" (causal Mamba-2 LM baseline).

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.d_model = 128  # Residual stream width; also the token-embedding dimension.
    m.n_layers = 4  # Number of Mamba-2 blocks in the denoiser / LM.
    m.d_state = 32  # SSM state size N per head (Mamba-2 default 128).
    m.expand = 2  # d_inner = expand * d_model.
    m.headdim = 32  # SSD head dimension P; nheads = d_inner // headdim.
    m.ngroups = 1  # B/C groups shared by heads (nheads % ngroups == 0).
    m.d_conv = 4  # Width of the depthwise causal conv over [x | B | C].
    m.chunk_size = 64  # SSD chunk length (any seqlen works; padded internally).
    m.ssd_impl = "auto"  # "auto" | "xla" | "reference" | "pallas" (see dimba_jax.ssd.ssd).
    m.ssd_forward = "mosaic"  # Pallas forward kernels: "mosaic" | "triton" (dimba_jax.ssd.KernelConfig).
    m.ssd_backward = "mosaic"  # Pallas backward kernels under the Mosaic forward: "mosaic" | "triton".
    m.ssd_block_len = 0  # Mosaic kernel chunk length, 64 or 128 (0 = 128 for 16-bit, 64 for float32).
    m.ssd_forward_only_block_len = 128  # Mosaic chunk length of gradient-free calls, 64 or 128 (0 = ssd_block_len; used where it divides the training chunk). Batch-1 sampler, configs/base.py T=64, H100: 165.7 ms at 128 vs 177.5 at 64 (dimba_jax.ssd.KernelConfig).
    m.ssd_prologue = "pallas"  # Step sizes in front of the Mosaic SSD kernels (dt bias, softplus, limits, transpose, chunk cumsum of dt*A, the state pass's weights and chunk-end decays): "xla" | "pallas" (one Triton kernel, dimba_jax/ssd/pallas_prologue.py; nheads a multiple of 8; else XLA) | "auto" (the kernel in calls without a gradient, XLA's forward under differentiation; ssd()'s own default). H100: batch-1 sampler, configs/base.py T=64, 156.8 ms vs 158.2 with "xla"; SSD forward 0.221 vs 0.255 ms at 130m-L2k, fwd+bwd within 1.5%; train step 122.4 vs 122.8 ms (benchmarks/results/latency_levers_prenorm_prologue_h100.md, ssd_prologue_h100.md, train_throughput_prenorm_prologue*_h100.md).
    m.ssd_backward_warpgroups = 2  # Mosaic SSD chunk backward: consumer warpgroups per program, 1 or 2 (one per 64-row slab of a 128-chunk, where it fits, else 1; the same bits; dimba_jax.ssd.KernelConfig.backward_warpgroups). H200: SSD fwd+bwd at 1.3b-L2k 1.600 vs 1.904 ms (benchmarks/results/ssd_wg2_h200.md); configs/base.py train step 94.0 ms with both warpgroup knobs at 2 vs 101.5 (train_throughput_attr_h200.md, train_throughput_core_h200.md), AR base 48.9 vs 51.7 (train_throughput_core_ar_h200.md).
    m.ssd_output_warpgroups = 2  # Mosaic SSD chunk output: consumer warpgroups per program, 1 or 2 (16-bit x at chunk 128: one per 64-row slab, causal columns only; else 1; the same bits; dimba_jax.ssd.KernelConfig.output_warpgroups). H200: SSD fwd+bwd at 1.3b-L2k 1.562 ms with both warpgroup knobs vs 1.600 with the backward one (benchmarks/results/ssd_wg2_h200.md); batch-1 sampler, configs/base.py T=64: 129.2 vs 135.9 ms, the same tokens (latency_levers_owg2_h200.md).
    m.ssd_output_persistent = True  # Mosaic SSD chunk output with two warpgroups: one program per SM walking its (chunk, head, batch) tiles with the next tile's loads in flight (16-bit x at chunk 128; the same bits; dimba_jax.ssd.KernelConfig.output_persistent) instead of one program per tile (one block per SM: loads, products and store in sequence). One H100, same calls: configs/base.py train step 81.7 vs 84.6 ms; batch-1 sampler T=64 105.51 vs 109.67 ms (benchmarks/results/train_throughput_s30_h100.md, latency_levers_s30_root_h100.md).
    m.norm_impl = "auto"  # Mixer epilogue (gate + grouped RMS norm; bidirectional: both norms, flip, mean): "auto" | "xla" | "pallas". "pallas" = the fused Pallas kernels (layers/fused_norm.py; interpreted off GPU; headdim a power of two); "auto" = those kernels on a GPU where they take the sizes, in training and sampling (batch 1, H100, base T=64: 176.9 ms with both kernels vs 216.5 ms XLA), else XLA. Bidirectional: shared projections without seq_idx only, else XLA. H100, configs/base.py: 212.6 ms per train step with XLA, 171.0 fused, 132.3 with conv_impl fused too.
    m.softmax_impl = "auto"  # The numerator of the vocabulary softmax before its GEMM (softmax(s / t) @ E: the row max, the exponentials in the head's dtype, their sums; DimbaModel.softmax_embedding, every sampling step): "xla" (three passes over the (b, L, V) scores) | "pallas" (one Triton kernel reading each row once, layers/fused_softmax.py; interpreted off GPU; V a power of two <= 16384) | "auto" (the kernel on a GPU where it takes V). One H100, same call, batch-1 sampler T=64: 108.44 vs 109.67 ms, and 104.63 vs 105.51 with the persistent chunk output (benchmarks/results/latency_levers_s30_root_h100.md).
    m.conv_impl = "auto"  # Mixer prologue (depthwise conv + SiLU + split; bidirectional: both convs, flip, concatenation for the one SSD call): "auto" | "xla" | "pallas". "pallas" = the fused Pallas kernels (one forward, two backward; layers/fused_conv.py; interpreted off GPU; headdim and d_state powers of two); "auto" = those kernels on a GPU where they take the sizes, in training and sampling (batch 1, H100, base T=64: 176.9 ms with both kernels vs 216.5 ms XLA; causal: AR base step 57.9 vs 99.6 ms), else XLA. Not with seq_idx (XLA); bidirectional: shared projections only. H100, configs/base.py: 212.6 ms per train step with XLA, 140.8 fused, 123.4 with norm_impl fused too.
    m.conv_forward = "triton"  # The fused conv prologue's forward kernel (where conv_impl runs the fused kernels): "triton" (Pallas Triton, its tiles above) | "mosaic" (layers/mosaic_conv.py: Mosaic GPU; one program per 64-row block and column tile, TMA in and out; the Triton forward off Hopper or where it does not take the sizes). One H100: forward 0.143 vs 0.209 ms at configs/base.py's mixer, batch 16 (benchmarks/results/fused_mosaic_bwd2_h100.md); the T = 64 sampler 127.5 vs 133.3 ms (latency_levers_jit_core_h100.md). configs/base.py sets it (with conv_backward); the AR base step is 49.6 ms with both Mosaic kernels or none (one H100, benchmarks/results/train_throughput_ar_mosaic_h100.md), so the AR configs keep "triton".
    m.conv_backward = "triton"  # The fused conv backward's kernels: "triton" (two Pallas Triton kernels: g = dout * silu'(a) with the weight sums, then dxbc and ddt) | "mosaic" (the first of them as layers/mosaic_conv.py's conv_bwd_g_mosaic: the forward's program shape, one direction per program, both formed in original time, the backward half's cotangent read by 64 one-row TMAs; the second Triton's); the Triton kernels off Hopper. One H100: forward + backward 0.611 ms with both Mosaic kernels, 0.702 with the Mosaic forward, 0.774 all-Triton (fused_mosaic_bwd2_h100.md); the base train step 96.3 ms with both, 99.2 with the forward, 100.9 all-Triton, one call (train_throughput_jit_core_h100.md). A whole-backward kernel (g recomputed over a row halo and kept in shared memory, one warpgroup per direction) measured slower and is gone: 96.1 against 93.1 ms (train_throughput_hostcoin_h100.md).
    m.mixer_core_vjp = True  # Where conv_impl and norm_impl both run their fused kernels: the mixer's prologue -> SSD -> epilogue as one custom VJP whose backward kernels write the in-projection output's gradient into one buffer (layers/fused_mixer.py), instead of three full-width gradients XLA adds (one elementwise pass per mixer). The same values and gradient bits on CPU; on one H100 the SSD parameters' XLA-reduced gradients (A, D, dt_bias) differ by summation order, fused differently (1 ulp on one H100, up to ~1e-5 of an entry on another: benchmarks/results/gpu_tests_s21_h100.md, gpu_tests_s22_h100.log). H200: configs/base.py train step 99.7 vs 101.5 ms (train_throughput_attr_h200.md, train_throughput_core_h200.md), 92.7 with both warpgroup knobs too; AR base 50.5 vs 51.7 (train_throughput_core_ar_h200.md).
    m.bidirectional = True  # DIMBA denoiser sees both sides (forward + flipped scan); False = causal ablation.
    m.conditioning = "film"  # How timestep + pooled prompt condition the blocks: "film" or "additive".
    m.prompt_encoder = "mlp"  # "mlp" (light, trained) or "frozen" (a Mamba-2 stack from a checkpoint, no grads).
    m.prompt_encoder_checkpoint = ""  # Workdir of a dimba_jax run whose blocks form the frozen prompt encoder.
    m.tie_embeddings = True  # Output head weight-tied to the (normalised) embedding; False = separate head.
    m.embed_dim = 0  # Width e of the diffusion space (token embeddings, noise, x0_hat); 0 = d_model. A small e (16-64, Plaid) makes tokens resolve coarse to fine.
    m.embed_scale = 1.0  # Embedding rows are L2-normalised to norm embed_scale * sqrt(embed_dim) (unit-variance entries at 1.0; see models/dimba.py).
    m.time_embed_dim = 128  # Width of the sinusoidal timestep embedding before its MLP.
    m.self_condition = True  # Feed the previous x0 estimate back as an input channel (Plaid/CDCD).
    m.readout = "score_interp"  # "score_interp": x0_hat = softmax(logits) @ E, trained by CE (CDCD); "direct": regress x0_hat (the paper's x0-MSE).
    m.skip_logits = True  # Add the output prior (the exact per-token Gaussian likelihood of x_t under each embedding row) to the logits.
    m.posterior_input = False  # Also feed the stem each position's posterior mean under the output prior alone, softmax(prior_logits(x_t)) @ E (models/dimba.py).
    m.posterior_grad = True  # With posterior_input: gradients flow through the posterior channel into the embedding table; False makes it a constant of the input (less than half its training cost).
    m.logit_bias = False  # A learned per-token bias (V,) in the head's logits, zero at init: the unigram the noisiest levels need, without the blocks computing it.
    m.position_levels = False  # Also embed each position's own noise level into the stem (needed to train or sample with a wavefront; diffusion/wavefront.py).
    m.init_from_mamba_ssm = ""  # Directory of a mamba_ssm / HF Mamba-2 checkpoint to warm-start the blocks and embedding.
    m.compute_dtype = "float32"  # Activations dtype: "float32" or "bfloat16" (params stay in train.param_dtype).
    m.head_dtype = "bfloat16"  # Operand dtype of the vocabulary-sized GEMMs (DIMBA: tied head x @ E^T, output prior, softmax @ E; the AR model: its head; forward and backward): "bfloat16" (float32 accumulation; logits, softmaxes and x0_hat stay float32) or "float32" (TF32 on GPUs). configs/tiny.py on CPU at equal tokens: bound 11.01 vs 10.96 bits/token, judge ppl 1565 vs 1581, against 10.89 bits / 1591 for float32 at seed 1 (benchmarks/results/quality_tiny_head_cpu.md). H100, configs/base.py, float32 in the same call: train step 111.1 vs 114.9 ms (benchmarks/results/train_throughput_head_gs_h100.md); batch-1 sampler T=64 146.0 vs 150.4 ms (latency_levers_segments_h100.md).
    m.io_dtype = "float32"  # Operand and parameter dtype of the diffusion-space projections (DIMBA's stem x_t -> d_model, out_proj d_model -> e and the "mlp" prompt encoder's two GEMMs e -> 2 d_model -> d_model; forward and backward, float32 sums and outputs): "float32" (TF32 on GPUs) or "bfloat16" (configs/base.py, where it measured faster).

    # ------------------------------------------------------------ diffusion
    d = c.diffusion = ml_collections.ConfigDict()
    d.timesteps = 1000  # T of the cosine schedule's table (uniform noise sampling draws t in 1..T; the "uniform" sampling grid respaces it).
    d.t_power = 1.0  # noise_sampling "uniform": t = ceil(T u^(1/t_power)), u ~ U(0,1): 1 = uniform, > 1 draws noisy (large) t more often.
    d.cosine_s = 0.008  # Offset s of the cosine schedule alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2).
    d.logsnr_shift = 0.0  # Added to the schedule's log-SNR at every t (negative = noisier; see diffusion/schedule.py).
    d.noise_sampling = "warp"  # Training noise levels: "warp" (learned CDF of the loss over log-SNR, diffusion/warp.py) or "uniform" (t ~ U{1..T}).
    d.logsnr_range = (-15.0, 5.0)  # (noisiest, cleanest) log-SNR of the warp's domain and of the likelihood bound's integral.
    d.warp_bins = 80  # Linear pieces of the noise warp over logsnr_range.
    d.warp_floor = 0.05  # Mass added to every warp bin when drawing levels, as a fraction of the mean bin mass.
    d.mse_weight = 0.0  # Weight of the x0 MSE (the paper's objective; 1 with model.readout="direct").
    d.ce_weight = 1.0  # Weight of the token cross-entropy of the logits (the whole loss with score interpolation).
    d.wavefront = 0.0  # W_max of the wavefront of noise levels (0 = one level per sequence): left positions cleaner than right ones (diffusion/wavefront.py); needs noise_sampling "warp" and model.position_levels.
    d.wavefront_order = "left_to_right"  # Which positions of a wavefront are cleaner: "left_to_right" or "random" (a permutation per example).
    d.wavefront_prob = 0.5  # Fraction of training examples drawn with a wavefront (width ~ U(0, wavefront)); the rest use one level.
    d.self_cond_prob = 0.5  # Probability of the self-conditioning pass during training (if model.self_condition).
    d.self_cond_coin = "host"  # Who tosses that coin each train step: "host" (from (seed, step) on the host, `diffusion.losses.host_self_cond_coin`: two compiled steps, one with the pass and one without, no conditional, both compiled concurrently before the first step (`train.step.compile_variants`); every micro-batch of a step shares the coin) or "device" (from the step's PRNG key: a lax.cond in one compiled step, whose predicate a GPU reads on the host). H100, configs/base.py, same call: 87.7 ms host vs 92.9 ms device (benchmarks/results/train_throughput_hostcoin2_h100.md).
    d.prompt_drop_prob = 0.1  # Probability of dropping the prompt (classifier-free guidance training).
    d.layout_probs = (0.3, 0.5, 0.2)  # Probabilities of prompt layouts per example: (none, prefix, infill).
    d.max_prompt_frac = 0.5  # Largest fraction of a window used as a prompt / kept context.

    # ---------------------------------------------------------------- sample
    s = c.sample = ml_collections.ConfigDict()
    s.sampler = "ddim"  # "ddim" or "ddpm".
    s.steps = 32  # Reverse steps at sampling time (any number with grid "warp"; <= diffusion.timesteps with "uniform").
    s.eta = 0.0  # DDIM eta (0 = deterministic; 1 = DDPM-like variance).
    s.guidance = 1.0  # Classifier-free guidance scale (1 = conditional only, 0 = unconditional).
    s.clamp = False  # Snap x0_hat toward the embedding table (softmax-weighted) at each step (for readout="direct").
    s.grid = "warp"  # Where the steps sit: "warp" (quantiles of the learned noise warp) or "uniform" (strided timesteps of the schedule).
    s.wavefront = 0.0  # Wavefront width W at sampling (0 = every position at the same level; <= diffusion.wavefront of training; grid "warp").
    s.wavefront_order = "left_to_right"  # Order of the sampling wavefront: "left_to_right" or "random" (a permutation per sample).
    s.length = 128  # Generated tokens per sample (excluding the prompt).
    s.num_samples = 4  # Samples written at each sampling interval / in --mode sample.
    s.score_temperature = 0.8  # Each step's x0_hat = softmax(logits / score_temperature) @ E (< 1 sharpens the estimate; 0.8 keeps configs/small.py's sample entropy within 5% of real text, lower trades entropy for judge perplexity).
    s.score_temperature_final = 0.0  # > 0: the score temperature of the last step, linear in the step index from score_temperature at the first (0 = constant).
    s.score_min_p = 0.0  # > 0: each step's x0_hat re-weighting keeps the tokens at least this fraction as likely as each position's most likely one (0 = all; sample.score_temperature).
    s.draw_x0 = False  # True: each step moves toward the embedding of a token drawn from its scores (ancestral), not toward their mean.
    s.prior_weight = 1.0  # Weight of the output prior (model.skip_logits) in the sampling logits: 1 = as trained; < 1 trusts each position's own noisy evidence less, the context more.
    s.prior_weight_final = -1.0  # >= 0: the prior weight of the last step, linear in the step index from prior_weight at the first (< 0 = constant).
    s.temperature = 0.0  # Final token read-out: 0 = argmax of the head, >0 = sample at this temperature.
    s.gemm = "auto"  # The sampling program's GEMMs: "auto" | "xla" | "cublas". "cublas" compiles it with XLA's Triton GEMM emitter off, so GEMMs XLA would fuse with their operands' elementwise producers run as cuBLAS calls (diffusion/sampler.py:program_options); "auto" = "cublas" on a GPU (batch-1 base T=64, H100: 138.52 vs 141.97 ms with "xla", same tokens; benchmarks/results/latency_levers_gemm_h100.md), else "xla". No effect on training (its GEMMs are cuBLAS already: 111.8 vs 111.2 ms, train_throughput_tgemm_off_h100.md).
    s.unroll = 1  # Unroll factor of the sampling loop's lax.scan (>= 1): the same computation and tokens in fewer loop iterations; the T = 64 base sampler idles 2.55 ms per call between kernels over its 64 iterations (benchmarks/results/latency_levers_prof12_h100_profile.md). H100, T = 64, same call: unroll 4 117.34 vs 117.50 ms (within noise), compiled in 15.8 vs 8.2 s (benchmarks/results/latency_levers_unroll_h100.md): 1 stays.

    # ------------------------------------------------------------------ data
    a = c.data = ml_collections.ConfigDict()
    a.source = "embedded"  # "embedded" (corpus shipped in the package) | "files:GLOB" (.txt/.jsonl/.jsonl.xz) | "tfds:NAME".
    a.val_source = ""  # Validation source in the same syntax; "" = the held-out part of `source`.
    a.text_field = "text"  # Field holding the text in jsonl records / tfds examples.
    a.tfds_split = "train"  # Split read from a tfds source.
    a.tokenizer = "byte"  # "byte" (no files), "bpe" / "bpe_2048" (the committed 8192- / 2048-id BPE vocabularies in the package) or "bpe:PATH".
    a.seq_len = 128  # Tokens per training window (documents packed with EOS).
    a.shuffle_buffer_docs = 0  # Reserved; shuffling is a global grain index shuffle over windows (deterministic).
    a.num_workers = 0  # grain worker processes (0 = in-process).
    a.max_docs = 0  # Use at most this many documents (0 = all); handy for quick experiments.
    a.tfds_data_dir = ""  # data_dir of tfds sources ("" = tfds's default, ~/tensorflow_datasets).
    a.heldout_fraction = 0.05  # files/tfds sources without val_source: last fraction of documents held out for validation.
    a.token_cache_dir = ""  # Cache the tokenised training stream here as .npy (memory-mapped on reuse); "" = no cache.

    # ----------------------------------------------------------------- train
    t = c.train = ml_collections.ConfigDict()
    t.steps = 300  # Optimizer steps.
    t.batch_size = 32  # Global batch size in windows (split across processes and data/fsdp devices).
    t.grad_accum = 1  # Micro-batches accumulated per optimizer step.
    t.lr = 3e-3  # Peak learning rate (AdamW).
    t.warmup_steps = 30  # Linear warm-up steps, then cosine decay to lr * final_lr_frac.
    t.final_lr_frac = 0.1  # Cosine decay floor as a fraction of the peak learning rate.
    t.weight_decay = 0.01  # AdamW decoupled weight decay (not on A_log, dt_bias, D, norms, embeddings).
    t.decay_embeddings = False  # Apply weight decay to embeddings too.
    t.b1 = 0.9  # AdamW beta1.
    t.b2 = 0.95  # AdamW beta2.
    t.grad_clip = 1.0  # Global-norm gradient clipping (0 = off).
    t.ema_decay = 0.999  # EMA of parameters used for sampling (0 = no EMA).
    t.ema_every = 1  # Update the EMA on every k-th step only, with the product of its k steps' decays (the k steps' parameters taken as the last): k-1 of k steps skip its pass over the parameters (train/optim.py:update_ema; 1 = every step).
    t.param_dtype = "float32"  # Parameter and optimizer-state dtype.
    t.param_layout = "tree"  # How the train step holds params, moments and EMA: "tree" (one array per parameter, sharded by the mesh's rules), "flat" (one vector per weight-decay group, train/flat.py: the update, the EMA and the gradient norm a few kernels over a few vectors; parameters replicated, so fsdp and tensor must be 1) or "auto" (flat where the mesh shards no parameter, else tree). Checkpoints hold trees either way.
    t.checkpoint_every = 100  # Save a checkpoint every this many steps (and at the end / on SIGTERM).
    t.keep_checkpoints = 3  # Keep the last N checkpoints.
    t.log_every = 10  # Metrics (JSON lines + TensorBoard) every this many steps.
    t.sample_every = 0  # Write samples every this many steps (0 = only at the end).
    t.eval_every = 0  # Validation loss every this many steps (0 = only at the end).
    t.eval_batches = 4  # Validation batches per evaluation.
    t.async_checkpointing = True  # Save checkpoints in a background thread (training continues during the write).
    t.peak_flops = 0.0  # Peak FLOP/s per device for MFU (0 = from the table in dimba_jax/models/flops.py by device kind).

    # ------------------------------------------------------------------ mesh
    h = c.mesh = ml_collections.ConfigDict()
    h.data = -1  # Size of the `data` mesh axis (-1 = all remaining devices).
    h.fsdp = 1  # Size of the `fsdp` axis (parameters and optimizer state sharded over it).
    h.tensor = 1  # Size of the `tensor` axis (model-parallel inner dimensions).
    # Logical axis name -> mesh axes. Layers annotate parameters with logical names only.
    h.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("state", None),
        ("conv", None),
        ("seq", None),
    )
    # Multi-process: leave empty to read the cluster's environment (SLURM/TPU) or run one process.
    h.coordinator_address = ""  # "host:port" of process 0 for jax.distributed.initialize.
    h.num_processes = 1  # Total processes (with coordinator_address).
    h.process_id = 0  # This process's index (with coordinator_address).

    # -------------------------------------------------------------------- ar
    # Autoregressive baseline (task="ar", dimba_jax.models.ar); model sizes come from `model`.
    r = c.ar = ml_collections.ConfigDict()
    r.temperature = 1.0  # Sampling temperature of the AR baseline's samples (0 = greedy argmax).
    r.top_p = 0.95  # Nucleus mass of the AR baseline's samples (1 = no truncation).
    r.pad_vocab_size_multiple = 16  # Embedding rows padded to this multiple (mamba_ssm's rule; 16 in the published Mamba-2 checkpoints).

    c.lock()
    return c


def use_shared_corpus(c: ml_collections.ConfigDict, data_dir: str | None = None) -> None:
    """Points `c.data` at the Gutenberg corpus (train-*.jsonl.xz + validation.jsonl.xz) in place.

    data_dir: the folder holding the shards; default `$DIMBA_DATA`, else `.gpu/data`. Sets
    data.source, data.val_source, data.tokenizer ("bpe") and data.token_cache_dir
    (`<data_dir>/cache`, so the GPU configs tokenise the corpus once and reuse it on resume).
    """
    data = data_dir or os.environ.get("DIMBA_DATA", ".gpu/data")
    c.data.source = f"files:{data}/train-*.jsonl.xz"
    c.data.val_source = f"files:{data}/validation.jsonl.xz"
    c.data.tokenizer = "bpe"
    c.data.token_cache_dir = f"{data}/cache"


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports the config file `path` and returns its `get_config()`.

    Raises:
      FileNotFoundError: no such file.  ValueError: the file has no get_config().
    """
    import importlib.util

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "dimba_user_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config()


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name`.py in the folder of `config_file` (a config
    file's `__file__`), so one config can build on another (configs/ar_small.py on small.py).
    Raises FileNotFoundError if that file does not exist."""
    return load_config_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))
