"""Latency levers for batch-1 generation: DIMBA DDIM (T=64, T=16) and the AR baseline, per variant.

At batch 1 and L=1024 a DIMBA denoiser call (~1.5 ms inside the sampling scan on an H200) and an
AR decode step (~0.4 ms) are launch/latency bound: hundreds of small kernels per step. This script
measures the levers that can cut that, each variant in its own subprocess (XLA_FLAGS must be set
before jax starts, and an unknown flag aborts the process, which then only loses that variant):

  base        the configs as they are (compute bf16, ssd_impl "auto": "pallas" on Hopper), default XLA flags
  cb_while    command buffers also for WHILE/CONDITIONAL (the whole scan loop as one CUDA graph)
              and --xla_gpu_graph_min_graph_size=1
  cb_min1     --xla_gpu_graph_min_graph_size=1 (default command-buffer types; small regions too)
  pallas      ssd_impl "pallas" (the Triton-backend SSD kernel, forward only when sampling)
  pallas_cb   pallas + cb_while
  generator   DIMBA T=64 as the program alone beside the harness's whole call
              (`DimbaGenerator.generate`: the host arrays, the key and the output slice too;
              what benchmarks/vs_mamba_ssm.py times), in one process, and the program given
              fresh device inputs at every call ("fresh": tokens, mask and key copied to new
              buffers beforehand, so the call's input addresses change as a server's do)
  packing     DIMBA T=64 as make_sample_fn runs it (the state's small arrays packed into one
              array per dtype, sliced out in the program) beside every state array its own
              argument ("unpacked": `bound_program(..., pack_max=-1)`), in one process
  generator_cb_off  generator without CUDA graphs (--xla_gpu_enable_command_buffer=): whether
              the generator's extra time is the graphs' update for changed buffer addresses
  extras      what two sampling settings cost: DIMBA without clamping ("noclamp": no vocabulary
              softmax per step; changes the samples) and AR with top_p = 1 (no nucleus sort per
              token; changes the samples)
  unroll4     lax.scan unroll 4 of the step loop (DIMBA sampler's `unroll`; AR decode loop too)
  cb_off      --xla_gpu_enable_command_buffer= (no CUDA graphs: what the default graphs give)
  matmul_pass the chunked SSD's state passing across chunks (a `lax.associative_scan`: log-depth
              slices, pads and concatenations at 8 chunks) as one masked (chunks x chunks) decay
              matrix times the chunk states (benchmark-only patch of dimba_jax.ssd.chunked, see
              `matmul_state_pass`; a win is a proposal for chunked.py). On CPU XLA fuses the scan's
              pieces away (712 loop-body ops per step either way); GPU fusion may differ
  cb_matmul_pass  matmul_pass + cb_while
  f32         compute dtype float32 instead of bfloat16
  cb_unroll4  cb_while + unroll4
  reference   ssd_impl "reference" (sequential lax.scan over time; expected slow, for the record)
  mixer_xla   model.conv_impl and model.norm_impl "xla" (the mixer's conv and gated norm in XLA,
              as "auto" runs them when sampling)
  mixer_pallas  both "pallas" (the fused forward kernels in the sampler too)
  conv_pallas  model.conv_impl "pallas" alone (the fused conv forward, DIMBA T=64 only)
  norm_pallas  model.norm_impl "pallas" alone (the fused gated-norm forward, DIMBA T=64 only)
  mixer_pallas_cb  mixer_pallas + cb_while (whether the kernels' custom calls cost the sampler
              its CUDA graphs)
  ssd_xla     ssd_impl "xla" (the chunked SSD in XLA instead of the Mosaic forward kernels:
              whether the kernels' launches cost more than they save at batch 1)
  head_f32    model.head_dtype "float32" (the sampler's vocabulary GEMMs, output prior, tied
              head and softmax @ E, on float32 operands instead of the default bf16 ones)
  tgemm_off   --xla_gpu_enable_triton_gemm=false (XLA's GEMMs with fused operands go to cuBLAS
              instead of its Triton GEMM emitter: the projections' prologues become separate kernels;
              measured faster, now the sampler's default through `sample.gemm`, which sets that
              option on the sampling program alone; `--variant triton:sample.gemm=xla` times the
              Triton GEMMs against it)

Every variant times DIMBA DDIM T=64 and T=16 at L_gen tokens and the AR baseline generating
L_gen tokens (batch 1, unprompted, median of --repeats calls, compile excluded, synchronised
with block_until_ready; the calls are the pre-split jitted programs the harness uses, with the config's sample
settings (guidance 1: unprompted): `sampler.sampler_parts`' bound program as `make_sample_fn` runs it,
`ar.generate_bound`; variant "unbound" times DIMBA through `sampler.sample_program`, the graph a
static argument hashed at every call, as before the bound program). Weights are random (timing does not depend on
them) and the same in every variant (fixed seeds), so `same_ids_as_base` says whether a variant
changes the generated tokens. Per variant it also derives the cost of one DIMBA step and the
fixed part of a call from T=64 and T=16: step_ms = (t64 - t16) / 48.

Results are written after every measurement to OUT/latency_levers.json and .md (OUT = --out).
With --profile 1 (default) the base variant (or those of --profile-variants) also traces two
calls of DIMBA T=64 with jax.profiler and summarises them with benchmarks.profile_summary
(OUT/profile_summary_<variant>_dimba_T64.md;
its "step" is one whole sampling call: kernel time, top kernels, idle gap = wall - busy, i.e. the
launch-bound share; the raw trace is deleted after a successful summary). AR is not traced (1024
tokens x ~400 kernels make a trace too large to summarise within the budget).

GPU command (one H200; ~200 s):

    timeout 240 python3 -m benchmarks.latency_levers --out $OUT --budget-s 220

Subsets: --variants base,cb_while,pallas_cb (in the given order); further variants of config
overrides: --variant fo128:model.ssd_forward_only_block_len=128 (repeatable, run after them).
The budget rarely covers every variant in one call (each costs ~40-60 s: start, three compilations,
timing); continue in a second call from the first one's JSON (finished variants are skipped, rows
accumulate, `same_ids_as_base` and the derived numbers then span both calls):

    cp $OUT/latency_levers.json benchmarks/results/latency_levers_h200.json   # after call 1
    timeout 240 python3 -m benchmarks.latency_levers --out $OUT --budget-s 220 \
        --previous benchmarks/results/latency_levers_h200.json

CPU smoke run (tests): --smoke (tiny random models, L_gen 32, T in {4, 2}, AR 32 tokens).

Applying a winning XLA flag set to pareto.py: put it in the launch command, e.g.
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \\
               --xla_gpu_graph_min_graph_size=1" python3 -m benchmarks.pareto ...
(the flags only change how kernels are launched, not what they compute; the JSON shows whether the
tokens stayed identical). A winning ssd_impl or dtype is a config field
(--config.model.ssd_impl=pallas or xla, and the config.model.ssd_* kernel fields); a
winning unroll is `make_sample_fn(..., unroll=4)` / `sample_program()(..., unroll=4)`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_CB_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# name -> settings. xla_flags are appended to any XLA_FLAGS of the caller's environment.
_CB_WHILE = f"--xla_gpu_enable_command_buffer={_CB_ALL} --xla_gpu_graph_min_graph_size=1"
# name -> settings, in the default order (most informative first: the budget may stop the run).
# xla_flags are appended to any XLA_FLAGS of the caller's environment; "overrides" are config
# overrides ([dotted key, text value] pairs) set on both configs; "cases" replaces the default
# cases (DIMBA at each --steps value and AR).
VARIANTS: dict[str, dict] = {
    "base": {},
    "cb_while": {"xla_flags": _CB_WHILE},
    "cb_min1": {"xla_flags": "--xla_gpu_graph_min_graph_size=1"},
    "pallas": {"overrides": [["model.ssd_impl", "pallas"]]},
    "pallas_cb": {"overrides": [["model.ssd_impl", "pallas"]], "xla_flags": _CB_WHILE},
    "extras": {"cases": ["dimba_T{hi}_noclamp", "ar_topp1"]},
    "unroll4": {"unroll": 4, "cases": ["dimba_T{hi}"]},
    "cb_off": {"xla_flags": "--xla_gpu_enable_command_buffer="},
    "matmul_pass": {"state_pass": "matmul"},
    "cb_matmul_pass": {"state_pass": "matmul", "xla_flags": _CB_WHILE},
    "f32": {"overrides": [["model.compute_dtype", "float32"]]},
    "cb_unroll4": {"unroll": 4, "xla_flags": _CB_WHILE},
    "reference": {"overrides": [["model.ssd_impl", "reference"]], "cases": ["dimba_T{lo}", "ar"]},
    "mixer_xla": {"overrides": [["model.conv_impl", "xla"], ["model.norm_impl", "xla"]]},
    "mixer_pallas": {"overrides": [["model.conv_impl", "pallas"], ["model.norm_impl", "pallas"]]},
    "conv_pallas": {"overrides": [["model.conv_impl", "pallas"]], "cases": ["dimba_T{hi}"]},
    "mosaic_conv": {"overrides": [["model.conv_forward", "mosaic"]], "cases": ["dimba_T{hi}"]},
    "triton_conv": {"overrides": [["model.conv_forward", "triton"]], "cases": ["dimba_T{hi}"]},
    "norm_pallas": {"overrides": [["model.norm_impl", "pallas"]], "cases": ["dimba_T{hi}"]},
    "mixer_pallas_cb": {"overrides": [["model.conv_impl", "pallas"], ["model.norm_impl", "pallas"]],
                        "xla_flags": _CB_WHILE},
    "ssd_xla": {"overrides": [["model.ssd_impl", "xla"]]},
    "head_f32": {"overrides": [["model.head_dtype", "float32"]]},
    "tgemm_off": {"xla_flags": "--xla_gpu_enable_triton_gemm=false"},
    "unbound": {"dispatch": "unbound", "cases": ["dimba_T{hi}", "dimba_T{lo}"]},
    "generator": {"cases": ["dimba_T{hi}", "dimba_T{hi}_fresh", "dimba_T{hi}_generator"]},
    "packing": {"cases": ["dimba_T{hi}", "dimba_T{hi}_unpacked"]},
    "generator_cb_off": {"cases": ["dimba_T{hi}", "dimba_T{hi}_fresh", "dimba_T{hi}_generator"],
                         "xla_flags": "--xla_gpu_enable_command_buffer="},
}
DEFAULT_ORDER = list(VARIANTS)
RESULT_TAG = "@@LEVER "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="output folder (default: $OUT, else the current folder)")
    p.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget of the whole call")
    p.add_argument("--variants", default=",".join(DEFAULT_ORDER), help="comma list, run in this order")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a further variant (repeatable; run after --variants): config overrides "
                        "set on both the DIMBA and the AR config, e.g. "
                        "fo128:model.ssd_forward_only_block_len=128")
    p.add_argument("--dimba-config", default="configs/small.py")
    p.add_argument("--ar-config", default="configs/ar_small.py")
    p.add_argument("--L-gen", type=int, default=1024, help="generated tokens (DIMBA L and AR new tokens)")
    p.add_argument("--steps", default="64,16", help="DIMBA DDIM step counts (first = headline)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    p.add_argument("--min-variant-s", type=float, default=25.0,
                   help="start no variant with less than this left of the budget")
    p.add_argument("--variant-max-s", type=float, default=110.0,
                   help="kill a variant's process after this long (keeping what it measured)")
    p.add_argument("--previous", default="",
                   help="a latency_levers.json of an earlier call to continue: its rows are kept, its "
                        "finished variants skipped (unless --overwrite); the output holds both")
    p.add_argument("--overwrite", action="store_true", help="re-measure variants finished in --previous")
    p.add_argument("--compile-cache", default="runs/jax_cache",
                   help="persistent XLA compilation cache ('' = off; not used with --smoke)")
    p.add_argument("--profile", type=int, default=1,
                   help="1 = also trace 2 calls of the --profile-variants' DIMBA headline case "
                        "with jax.profiler under OUT/profile_<variant>_<case>/ and summarise "
                        "them with benchmarks/profile_summary.py (kernel time vs idle gaps); "
                        "0 = off")
    p.add_argument("--profile-variants", default="base",
                   help="comma list of the variants traced with --profile 1 (cb_off: kernels "
                        "outside CUDA graphs, so the summary attributes them to source lines)")
    p.add_argument("--out-dir-worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny random models on CPU (tests)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # JSON settings of one variant
    args = p.parse_args(argv)
    if args.smoke:  # tiny sizes on CPU
        args.L_gen, args.steps, args.repeats = 32, "4,2", 2
    return args


# ----------------------------------------------------------------------------- worker side
def _emit(record: dict) -> None:
    print(RESULT_TAG + json.dumps(record), flush=True)


_NOT_LAUNCHED = ("parameter(", "get-tuple-element(", "tuple(", "constant(", "bitcast(")


def _kernel_counts(compiled_text: str) -> dict:
    """Rough launch counts from optimized HLO text.

    Whole module: fusions, custom calls (cuBLAS gemms, Pallas/Triton kernels), while loops,
    conditionals. `loop_body_ops`: the instructions of the largest while-loop body that can
    launch work (everything but parameters, tuples, constants and bitcasts): about the kernels
    per sampling step (DIMBA) or per decoded token (AR).
    """
    lines = compiled_text.splitlines()
    counts = {"fusions": sum(" fusion(" in ln for ln in lines),
              "custom_calls": sum(" custom-call(" in ln for ln in lines),
              "whiles": sum(" while(" in ln for ln in lines),
              "conditionals": sum(" conditional(" in ln for ln in lines)}
    bodies = set(re.findall(r"body=%?([\w.\-]+)", compiled_text))
    best, best_kinds = 0, {}
    current, n, kinds = None, 0, {}
    for ln in lines:
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", ln)
        if head and not ln.startswith(" "):
            current, n, kinds = head.group(1), 0, {}
            continue
        if ln.startswith("}"):
            if current in bodies and n > best:
                best, best_kinds = n, kinds
            current = None
            continue
        if current in bodies and "=" in ln and not any(k in ln for k in _NOT_LAUNCHED):
            n += 1
            op = re.search(r"=\s*\S+\s+([a-z][\w\-]*)\(", ln)
            if op:
                kind = op.group(1)
                if kind == "custom-call":
                    target = re.search(r'custom_call_target="([^"]+)"', ln)
                    kind = f"custom-call:{target.group(1) if target else '?'}"
                kinds[kind] = kinds.get(kind, 0) + 1
    counts["loop_body_ops"] = best
    counts["loop_body_kinds"] = dict(sorted(best_kinds.items(), key=lambda kv: -kv[1])[:12])
    return counts


def matmul_state_pass(combine, elems, axis=0):
    """Drop-in for ``jax.lax.associative_scan(chunked._combine_chunks, (decay, states), axis=1)``.

    decay (b, c, g, r) float32 in [0, 1], states (b, c, g, r, p, n) float32 -> (decay, h_end) with
    h_end[:, c] = sum_{j <= c} (prod_{j < k <= c} decay[:, k]) states[:, j], computed as one
    einsum with the (c x c) matrix W[c, j] = exp(sum_{j < k <= c} log decay_k) (masked cumulative
    sums of logs, exact also where a decay is 0). Only the cumulative states are returned exactly;
    the first output (the cumulative decay, unused by chunked_scan) is the input decay. Any other
    call goes to the real associative_scan.
    """
    import jax
    import jax.numpy as jnp

    from dimba_jax.ssd import chunked

    if combine is not chunked._combine_chunks or axis != 1:
        return jax.lax.associative_scan(combine, elems, axis=axis)
    decay, states = elems
    n = decay.shape[1]
    logd = jnp.moveaxis(jnp.log(decay.astype(jnp.float32)), 1, -1)  # (b, g, r, c); -inf where 0
    idx = jnp.arange(n)
    below = idx[:, None] > idx[None, :]  # [k, j]: k > j
    terms = jnp.where(below, logd[..., :, None], 0.0)  # (b, g, r, k, j)
    seg = jnp.cumsum(terms, axis=-2)  # [c, j] = sum_{j < k <= c} log decay_k
    w = jnp.where(idx[:, None] >= idx[None, :], jnp.exp(seg), 0.0)
    h_end = jnp.einsum("bgrcj,bjgrpn->bcgrpn", w, states.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return decay, h_end


def _install_matmul_state_pass() -> None:
    """Routes chunked.py's `jax.lax.associative_scan` to `matmul_state_pass` (this process only)."""
    import types

    import jax

    from dimba_jax.ssd import chunked

    lax_proxy = types.SimpleNamespace(**{k: getattr(jax.lax, k) for k in dir(jax.lax) if not k.startswith("__")})
    lax_proxy.associative_scan = matmul_state_pass

    class _JaxProxy:
        lax = lax_proxy

        def __getattr__(self, name):
            return getattr(jax, name)

    chunked.jax = _JaxProxy()


def _configs(args, settings):
    from benchmarks import pareto  # config helpers of the Pareto driver
    from dimba_jax.train.overrides import apply_overrides

    if args.smoke:
        dimba_cfg, ar_cfg = pareto.smoke_config("dimba"), pareto.smoke_config("ar")
        ar_cfg.model.bidirectional = False
    else:
        dimba_cfg = pareto.load_config_file(os.path.join(ROOT, args.dimba_config) if not os.path.isabs(
            args.dimba_config) else args.dimba_config)
        ar_cfg = pareto.load_config_file(os.path.join(ROOT, args.ar_config) if not os.path.isabs(
            args.ar_config) else args.ar_config)
    for cfg in (dimba_cfg, ar_cfg):
        apply_overrides(cfg, [tuple(kv) for kv in settings.get("overrides", [])])
    return dimba_cfg, ar_cfg


def _ar_generate_unrolled(unroll: int):
    """ar.generate_split with a scan unroll factor (same computation; benchmark-local)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dimba_jax.models import ar

    @functools.partial(jax.jit, static_argnames=("graphdef", "num_new"))
    def gen(graphdef, state, prompt_ids, rng, temperature, top_p, num_new):
        model = nnx.merge(graphdef, state)
        logits, cache = model.prefill(prompt_ids)
        keys = jax.random.split(rng, num_new)
        first = ar.sample_logits(logits[:, -1], keys[0], temperature, top_p, model.vocab_size)

        def body(carry, key):
            cache, tok = carry
            step_logits, cache = model.step(tok, cache)
            tok = ar.sample_logits(step_logits, key, temperature, top_p, model.vocab_size)
            return (cache, tok), tok

        _, rest = jax.lax.scan(body, (cache, first), keys[1:], unroll=unroll)
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return gen


def run_worker(args) -> None:
    """Times every case of one variant; prints one RESULT_TAG JSON line per case."""
    settings = json.loads(args.worker)
    name = settings["name"]
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dimba_jax.diffusion import sampler as sampling
    from dimba_jax.diffusion.schedule import schedule_from_config
    from dimba_jax.evaluate import loading, timing
    from dimba_jax.models import ar

    device = jax.devices()[0]
    _emit({"variant": name, "case": "_device", "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")})
    dimba_cfg, ar_cfg = _configs(args, settings)
    if settings.get("state_pass") == "matmul":
        _install_matmul_state_pass()
    unroll = int(settings.get("unroll", 1))
    L = int(args.L_gen)
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    if settings.get("cases"):
        cases = [c.format(hi=steps_list[0], lo=steps_list[-1]) for c in settings["cases"]]
    else:
        cases = [f"dimba_T{steps_list[0]}", "ar"] + [f"dimba_T{s}" for s in steps_list[1:]]
    if args.compile_cache and not args.smoke:
        try:  # a rerun on a warm machine skips compilation (the key includes XLA_FLAGS)
            os.makedirs(args.compile_cache, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        except Exception as e:  # noqa: BLE001 - optional
            print(f"[levers] no compilation cache: {e}", flush=True)

    models = {}

    def dimba():
        if "dimba" not in models:
            model, _, tok = loading.fresh_model(dimba_cfg, seed=0)
            models["dimba"] = (model, nnx.split(model), schedule_from_config(dimba_cfg.diffusion), tok)
        return models["dimba"]

    def armodel():
        if "ar" not in models:
            model, _, tok = loading.fresh_model(ar_cfg, seed=1)
            models["ar"] = (model, nnx.split(model), tok)
        return models["ar"]

    for case in cases:
        t0 = time.perf_counter()
        try:
            if case.startswith("dimba_T"):
                steps = int(case.split("_")[1][1:])
                clamp = bool(dimba_cfg.sample.clamp) and not case.endswith("noclamp")
                model, (graphdef, state), schedule, tok = dimba()
                # the config's sampler, unprompted (guidance 1), as the harness's DimbaGenerator
                opts = dict(sampling.sampler_options(dimba_cfg.sample), steps=steps, sampler="ddim",
                            guidance=1.0, clamp=clamp, unroll=unroll)
                parts = sampling.sampler_parts(model, schedule, **opts)
                args_ = (jnp.zeros((1, L), jnp.int32), jnp.zeros((1, L), bool),
                         jax.random.PRNGKey(0)) + parts.consts
                if case.endswith("_generator"):  # the harness's whole call (host arrays, key, slice)
                    from dimba_jax.evaluate.generators import DimbaGenerator
                    from dimba_jax.evaluate.harness import RunSpec

                    gen, spec = DimbaGenerator(model, dimba_cfg, tok), RunSpec("dimba", "ddim", steps, L, False)

                    def call():
                        return gen.generate(spec, None, 1, 0)

                    lowered = parts.run.lower(parts.params, *args_)
                elif case.endswith("_fresh"):  # new input buffers at every call (copies made beforehand)
                    pool = [tuple(jnp.array(np.asarray(a)) for a in args_[:3]) + args_[3:]
                            for _ in range(args.repeats + 2)]
                    turn = itertools.count()

                    def call():
                        return parts.run(parts.params, *pool[next(turn) % len(pool)])[0]

                    lowered = parts.run.lower(parts.params, *args_)
                elif case.endswith("_unpacked"):  # every state array its own argument (no packing)
                    run, params = sampling.bound_program(graphdef, state, opts["gemm"],
                                                         pack_max=-1, **parts.static)

                    def call():
                        return run(params, *args_)[0]

                    lowered = run.lower(params, *args_)
                elif settings.get("dispatch") == "unbound":  # the graph a static argument of each call
                    program = sampling.sample_program(opts["gemm"])

                    def call():
                        return program(graphdef, state, *args_, **parts.static)[0]

                    lowered = program.lower(graphdef, state, *args_, **parts.static)
                else:  # what make_sample_fn runs
                    def call():
                        return parts.run(parts.params, *args_)[0]

                    lowered = parts.run.lower(parts.params, *args_)
                info = {"model": "dimba", "steps": steps, "clamp": clamp,
                        "self_condition": bool(model.self_condition),
                        "sampler_options": dict(opts)}
            else:
                model, (graphdef, state), tok = armodel()
                top_p = 1.0 if case == "ar_topp1" else float(ar_cfg.ar.top_p)
                temp = float(ar_cfg.ar.temperature)
                args_ = (graphdef, state, jnp.full((1, 1), int(tok.eos_id), jnp.int32), jax.random.PRNGKey(0),
                         jnp.float32(temp), jnp.float32(top_p))
                if unroll == 1:  # what the harness's ArGenerator runs
                    gen, params = ar.generate_bound(graphdef, state, L)
                    bound_args = (params,) + args_[2:]

                    def call():
                        return gen(*bound_args)

                    lowered = gen.lower(*bound_args)
                else:
                    gen = _ar_generate_unrolled(unroll)

                    def call():
                        return gen(*args_, num_new=L)

                    lowered = gen.lower(*args_, num_new=L)
                info = {"model": "ar", "steps": L, "top_p": top_p, "temperature": temp}
            t_c = time.perf_counter()
            compiled = lowered.compile()  # shared with the jit cache: the warm-up call reuses it
            compile_s = time.perf_counter() - t_c
            try:
                counts = _kernel_counts(compiled.as_text())
            except Exception as e:  # noqa: BLE001 - diagnostics only
                counts = {"error": f"{type(e).__name__}: {e}"}
            t = timing.time_call(call, repeats=args.repeats)
            ids = np.asarray(t.result)
            profile_dir = ""
            if settings.get("profile") and args.out_dir_worker and case == f"dimba_T{steps_list[0]}":
                profile_dir = os.path.join(args.out_dir_worker, f"profile_{name}_{case}")
                try:
                    os.makedirs(profile_dir, exist_ok=True)
                    with open(os.path.join(profile_dir, "compiled_hlo.txt"), "w") as f:
                        f.write(compiled.as_text())
                    with jax.profiler.trace(profile_dir):
                        for _ in range(2):
                            jax.block_until_ready(call())
                except Exception as e:  # noqa: BLE001 - diagnostics only
                    print(f"[levers] profiling {case} failed: {type(e).__name__}: {e}", flush=True)
                    profile_dir = ""
            rec = dict(info, variant=name, case=case, L_gen=L, batch=1, latency_ms=t.median_ms,
                       min_ms=t.min_ms, times_ms=[round(v, 3) for v in t.times_ms],
                       compile_s=round(compile_s + t.compile_s, 2), ids_sha=hashlib.sha1(ids.tobytes()).hexdigest()[:16],
                       unroll=unroll, ssd_impl=str(dimba_cfg.model.ssd_impl if info["model"] == "dimba"
                                                   else ar_cfg.model.ssd_impl),
                       compute_dtype=str(dimba_cfg.model.compute_dtype), hlo_counts=counts,
                       profile_dir=profile_dir,
                       wall_s=round(time.perf_counter() - t0, 1))
        except Exception as e:  # noqa: BLE001 - report and continue with the next case
            rec = {"variant": name, "case": case, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
        _emit(rec)


# ----------------------------------------------------------------------------- parent side
def _derived(rows: list[dict], steps_list: list[int]) -> dict:
    """Per variant: DIMBA ms per step and fixed ms per call (from two step counts), AR ms per token,
    AR / DIMBA speed-up at the headline step count."""
    out = {}
    by_variant: dict[str, dict] = {}
    for r in rows:
        if "latency_ms" in r:
            by_variant.setdefault(r["variant"], {})[r["case"]] = r
    for v, cases in by_variant.items():
        d = {}
        if len(steps_list) >= 2:
            hi, lo = cases.get(f"dimba_T{steps_list[0]}"), cases.get(f"dimba_T{steps_list[1]}")
            if hi and lo and steps_list[0] != steps_list[1]:
                per = (hi["latency_ms"] - lo["latency_ms"]) / (steps_list[0] - steps_list[1])
                d["dimba_step_ms"] = per
                d["dimba_fixed_ms"] = hi["latency_ms"] - per * steps_list[0]
        a, h = cases.get("ar"), cases.get(f"dimba_T{steps_list[0]}")
        if a:
            d["ar_ms_per_token"] = a["latency_ms"] / a["L_gen"]
        if a and h:
            d[f"speedup_T{steps_list[0]}"] = a["latency_ms"] / h["latency_ms"]
        out[v] = d
    return out


def _write(out_dir: str, state: dict) -> None:
    rows, steps_list = state["rows"], state["steps"]
    base = {r["case"]: r for r in rows if r.get("variant") == "base" and "ids_sha" in r}
    for r in rows:
        if "ids_sha" in r and r["case"] in base:
            r["same_ids_as_base"] = r["ids_sha"] == base[r["case"]]["ids_sha"]
    state["derived"] = _derived(rows, steps_list)
    path = os.path.join(out_dir, "latency_levers.json")
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)
    lines = ["# Batch-1 latency levers", "", f"Command: `{state['command']}`  ", f"Device: {state.get('device')}  ",
             f"L_gen {state['L_gen']}, batch 1, median of {state['repeats']} calls (ms), compile excluded.", "",
             "| variant | case | latency ms | min ms | compile s | same ids as base | fusions/custom calls (module) | ops per loop step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("case", "").startswith("_"):
            continue
        if "latency_ms" in r:
            hc = r.get("hlo_counts") or {}
            lines.append(f"| {r['variant']} | {r['case']} | {r['latency_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{r['compile_s']:.1f} | {r.get('same_ids_as_base', '')} | "
                         f"{hc.get('fusions', '?')}/{hc.get('custom_calls', '?')} | {hc.get('loop_body_ops', '?')} |")
        else:
            lines.append(f"| {r.get('variant')} | {r.get('case')} | FAILED: {str(r.get('error'))[:150]} | | | | | |")
    lines += ["", "| variant | DIMBA ms/step | DIMBA fixed ms | AR ms/token | AR / DIMBA T=" + str(steps_list[0]) + " |",
              "|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for v, d in state["derived"].items():
        lines.append(f"| {v} | {fmt(d.get('dimba_step_ms'))} | {fmt(d.get('dimba_fixed_ms'))} | "
                     f"{fmt(d.get('ar_ms_per_token'))} | {fmt(d.get(f'speedup_T{steps_list[0]}'))} |")
    if state.get("variant_status"):
        lines += ["", "Variant status:", ""] + [f"- {k}: {v}" for k, v in state["variant_status"].items()]
    with open(os.path.join(out_dir, "latency_levers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _summarise_profiles(state: dict, out_dir: str, deadline: float) -> None:
    """Runs benchmarks.profile_summary on every profiled case (2 calls = 2 "steps")."""
    for r in state["rows"]:
        pdir = r.get("profile_dir")
        if not pdir or not os.path.isdir(pdir) or r.get("profile_summary"):
            continue
        left = deadline - time.perf_counter()
        if left < 8:
            break
        prefix = os.path.join(out_dir, f"profile_summary_{r['variant']}_{r['case']}")
        cmd = [sys.executable, "-m", "benchmarks.profile_summary", pdir, "--steps", "2", "--step-ms", f"{r['latency_ms']:.4f}",
               "--hlo", os.path.join(pdir, "compiled_hlo.txt"), "--out", prefix]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=min(60, left - 5), cwd=ROOT)
            r["profile_summary"] = prefix + ".md" if done.returncode == 0 else f"failed: {done.stderr[-500:]}"
            if done.returncode == 0:  # the raw trace and HLO are large; the summary is what matters
                import shutil

                shutil.rmtree(pdir, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - diagnostics only
            r["profile_summary"] = f"failed: {type(e).__name__}: {e}"
        print(f"[levers] profile summary {r['variant']} {r['case']}: {r['profile_summary']}", flush=True)


def run_parent(args, argv) -> dict:
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out_dir = args.out or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    specs = {n: VARIANTS[n] for n in names}
    from benchmarks.train_throughput import parse_variant
    from dimba_jax.config import default_config
    from dimba_jax.train.overrides import apply_overrides

    for text in args.variant:
        name, pairs = parse_variant(text)
        if name in specs:
            raise ValueError(f"--variant {text!r}: the name {name!r} is taken")
        apply_overrides(default_config(), pairs)  # an unknown key or a bad value fails here
        specs[name] = {"overrides": [list(kv) for kv in pairs]}
        names.append(name)
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    state = {"command": "python3 -m benchmarks.latency_levers " + " ".join(argv), "L_gen": args.L_gen,
             "repeats": args.repeats, "steps": steps_list, "rows": [], "variant_status": {},
             "variants": specs}
    if args.previous:
        if not os.path.isfile(args.previous):
            raise FileNotFoundError(f"--previous {args.previous!r} not found")
        with open(args.previous) as f:
            prev = json.load(f)
        if prev.get("L_gen") != args.L_gen or prev.get("steps") != steps_list:
            raise ValueError(f"--previous was measured at L_gen {prev.get('L_gen')} steps {prev.get('steps')}, "
                             f"this call at {args.L_gen} {steps_list}")
        redo = set(names) if args.overwrite else set()
        state["rows"] = [r for r in prev.get("rows", []) if r.get("variant") not in redo]
        state["variant_status"] = {k: v for k, v in prev.get("variant_status", {}).items() if k not in redo}
        state["variants"] = dict(prev.get("variants", {}), **state["variants"])
        state["command"] = prev.get("command", "") + " ; " + state["command"]
        for key in ("device", "jax"):
            if prev.get(key):
                state[key] = prev[key]
    passthrough = ["--L-gen", str(args.L_gen), "--steps", args.steps, "--repeats", str(args.repeats),
                   "--dimba-config", args.dimba_config, "--ar-config", args.ar_config,
                   "--compile-cache", args.compile_cache] + (
        ["--smoke"] if args.smoke else [])
    for name in names:
        if str(state["variant_status"].get(name, "")).startswith("ok") and not args.overwrite:
            print(f"[levers] variant {name}: already measured (--previous); skipped", flush=True)
            continue
        left = deadline - time.perf_counter()
        if left < args.min_variant_s:
            state["variant_status"][name] = f"skipped: {left:.0f}s of the budget left"
            print(f"[levers] {state['variant_status'][name]}", flush=True)
            continue
        settings = dict(specs[name], name=name)
        if args.profile and name in args.profile_variants.split(","):
            settings["profile"] = True
        state["rows"] = [r for r in state["rows"] if r.get("variant") != name]  # a re-run replaces them
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if settings.get("xla_flags"):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + settings["xla_flags"]).strip()
        if args.smoke:
            env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "benchmarks.latency_levers", "--worker", json.dumps(settings),
               "--out-dir-worker", os.path.abspath(out_dir)] + passthrough
        t0 = time.perf_counter()
        stop_at = min(deadline - 3, t0 + args.variant_max_s)
        print(f"[levers] variant {name}: {settings} (timeout {stop_at - t0:.0f}s)", flush=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT)
        tail: list[str] = []
        status = "ok"
        try:
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = stop_at - time.perf_counter()
                if remaining <= 0:
                    proc.kill()
                    status = "killed at its time limit (--variant-max-s or the budget)"
                    break
                if not sel.select(timeout=min(remaining, 5.0)):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith(RESULT_TAG):
                    rec = json.loads(line[len(RESULT_TAG):])
                    if rec.get("case") == "_device":
                        state.setdefault("device", rec.get("device"))
                        state.setdefault("jax", rec.get("jax"))
                        state["variant_status"][name] = f"started (XLA_FLAGS={rec.get('xla_flags')!r})"
                        continue
                    state["rows"].append(rec)
                    msg = (f"{rec['latency_ms']:.2f} ms (compile {rec['compile_s']}s)" if "latency_ms" in rec
                           else f"FAILED {rec.get('error')}")
                    print(f"[levers] {name:10s} {rec['case']:22s} {msg}", flush=True)
                    _write(out_dir, state)
                else:
                    tail.append(line.rstrip())
                    tail = tail[-40:]
            proc.wait(timeout=10)
        except Exception as e:  # noqa: BLE001 - keep going with the next variant
            status = f"parent error {type(e).__name__}: {e}"
            proc.kill()
        rc = proc.returncode
        if status == "ok" and rc != 0:
            status = f"exit code {rc}"
        state["variant_status"][name] = f"{status} after {time.perf_counter() - t0:.0f}s"
        if status != "ok":
            state["variant_status"][name] += "; output tail: " + " | ".join(tail[-8:])[-1500:]
            print(f"[levers] variant {name}: {status}\n" + "\n".join(tail[-20:]), flush=True)
        _write(out_dir, state)
    _write(out_dir, state)
    _summarise_profiles(state, out_dir, deadline)
    _write(out_dir, state)
    print(f"[levers] done in {time.perf_counter() - t_start:.0f}s -> {out_dir}/latency_levers.json", flush=True)
    for v, d in state.get("derived", {}).items():
        print(f"[levers] {v:10s} " + " ".join(f"{k}={val:.3f}" for k, val in d.items()), flush=True)
    return state


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    return run_parent(args, argv)


if __name__ == "__main__":
    main()
