"""Where the time of one train step goes, measured piece by piece (no profiler needed).

    python -m benchmarks.step_breakdown --config configs/base.py --per-device-batch 16 \
        --budget-s 210 --out benchmarks/results/step_breakdown_h200

On one H200 through the device tool (carry .whl; about 4 minutes, the first seven cases fit):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
    timeout 215 python3 -m benchmarks.step_breakdown --config configs/base.py --per-device-batch 16 \
        --step-ms 190.2 --budget-s 180 --profile-dir /tmp/sb_prof --out $OUT/step_breakdown_h200

Each case is a separately jitted program on the config's model at the measured shape (the
global batch of `--per-device-batch` x devices, `--seq-len` or the config's). It is compiled
(timed apart), run `--warmup` times, then timed in `--repeats` windows of `--steps` calls
dispatched back to back, the clock stopping when the last call's outputs are ready (device
synchronised); the median window / steps is reported. Cases, in the order they run:

  proj          the in_proj and out_proj GEMMs of ONE Mamba-2 block, forward + backward
                (3 GEMMs each, bf16 when model.compute_dtype is) on random inputs and
                cotangents; x n_layers = every block projection of the step
  head          the tied output head + rounding cross-entropy + accuracy, forward + backward
                (what the x0-MSE-only loss would not pay: see "ce" below)
  block_ssd     ONE DimbaBlock (norm, FiLM, bidirectional Mamba-2 with the real SSD of
                model.ssd_impl) forward + backward; x n_layers = all blocks
  block_no_ssd  the same block with the SSD call replaced by the identity (y = x); the
                difference is the SSD's own cost (both directions, fwd + bwd)
  fwd_bwd       loss + gradients of the whole model (no optimizer), the real loss
                (self-conditioning coin, layouts, CE) with a different RNG key per call
  optimizer     global-norm clip + AdamW + EMA + the gradient norm, on given gradients
                (optim.apply_update; parameters, moments and EMA donated, as in the step)
  optimizer_flat  the same update on ONE float32 vector of as many parameters: the same
                bytes without a kernel per parameter (optimizer - optimizer_flat = what the
                tree's hundreds of small leaves cost)
  train_step    the real jitted train step (dimba_jax.train.step, state donated)
  fwd           the loss alone (forward)
  fwd_bwd_sc0   fwd_bwd with diffusion.self_cond_prob = 0 (never the extra forward)
  fwd_bwd_sc1   fwd_bwd with diffusion.self_cond_prob = 1 (always the extra forward)

Why no "fwd_bwd without the head" via the config: diffusion.ce_weight = 0 still computes the
logits (the CE and accuracy are reported as metrics, and 0 * ce does not let XLA drop the
backward), so the head's share is measured directly ("head") instead.

For each case: ms, % of the train step (the measured `train_step`, else `--step-ms`), XLA's
FLOP count of the program and the FLOP/s it reaches, and for proj / head the analytic GEMM
FLOPs (2 m n k per GEMM) and their TFLOP/s against the device's peak. Derived numbers: the SSD
cost per block and for all blocks, all projections, the non-block remainder of fwd_bwd, the
self-conditioning pass, and the model FLOP/s of fwd_bwd (task.flops_per_token).

`--profile-dir DIR` also traces 3 calls of each `--profile-cases` case (default block_ssd,
fwd_bwd, train_step) with train_throughput.profiler_options and writes their profile_summary
(with the completeness check against the case's own HLO) to PREFIX_profile.json / .md: per-kernel
views that cost no extra compile (a few seconds each to trace and parse).

`--cases a,b,...` picks cases; `--budget-s` stops starting a case once elapsed time plus the
longest case so far would pass it; a failing case is recorded and the next one runs. Results
(JSON + Markdown) are rewritten after every case, so a timeout keeps what was measured.
Config overrides: `--config.KEY=VALUE` as in dimba_jax.main.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shlex
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import profile_summary
from benchmarks import train_throughput as tt  # shared setup
from dimba_jax.diffusion import losses
from dimba_jax.layers import mamba2 as mamba2_lib
from dimba_jax.models.dimba import DimbaBlock, resolve_dtype
from dimba_jax.models import flops as flops_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import optim
from dimba_jax.train import overrides as ov
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.tasks import make_task

# Cheap, most telling cases first; on an H200 the whole-model programs take ~30-80 s each to
# compile, so a tight --budget-s drops the last ones.
CASES = ("proj", "head", "block_ssd", "block_no_ssd", "fwd_bwd", "optimizer", "optimizer_flat",
         "train_step", "fwd", "fwd_bwd_sc0", "fwd_bwd_sc1")
N_KEYS = 8  # distinct RNG keys cycled through by the loss cases (the self-cond coin varies)


def parse_args(argv):
    rest, pairs = ov.split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--per-device-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=0, help="0 = config.data.seq_len")
    p.add_argument("--devices", type=int, default=1, help="use the first N devices (0 = all)")
    p.add_argument("--steps", type=int, default=5, help="calls per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {CASES}")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="reference step time when train_step is not measured (0 = none)")
    p.add_argument("--budget-s", type=float, default=0.0, help="0 = no bound")
    p.add_argument("--profile-dir", default="",
                   help="also trace 3 calls of each --profile-cases case here (jax.profiler, "
                        "the options of train_throughput.profiler_options)")
    p.add_argument("--profile-cases", default="block_ssd,fwd_bwd,train_step",
                   help="comma-separated cases to trace when --profile-dir is given")
    p.add_argument("--out", default="", help="output prefix: PREFIX.json + PREFIX.md")
    args = p.parse_args(rest)
    if min(args.per_device_batch, args.steps, args.repeats) < 1 or args.warmup < 0:
        raise ValueError("--per-device-batch, --steps, --repeats must be >= 1, --warmup >= 0")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        raise ValueError(f"--cases {unknown or '(empty)'}: choose from {CASES}")
    args.cases = cases
    args.profile_cases = [c.strip() for c in args.profile_cases.split(",") if c.strip()]
    if set(args.profile_cases) - set(CASES):
        raise ValueError(f"--profile-cases {sorted(set(args.profile_cases) - set(CASES))}: "
                         f"choose from {CASES}")
    return args, pairs


# ------------------------------------------------------------------------------ timing

def time_case(fn, example_args, make_run, steps: int, repeats: int, warmup: int) -> dict:
    """Compiles `fn` (a jax.jit function) for `example_args`, then times `run(i)`.

    make_run(compiled) -> run(i) returning a pytree to wait for (call i of a window).
    Returns {"ms": median of the windows' per-call ms, "windows_ms", "compile_s",
    "xla_flops", "memory", "_compiled", "_run"} (the last two for profiling; not saved).
    """
    t0 = time.perf_counter()
    compiled = fn.lower(*example_args).compile()
    compile_s = time.perf_counter() - t0
    xla_flops, memory = tt.compiled_costs(compiled)
    run = make_run(compiled)
    for i in range(warmup):
        jax.block_until_ready(run(i))
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(steps):
            out = run(i)
        jax.block_until_ready(out)
        windows.append((time.perf_counter() - t0) / steps * 1e3)
    return {"ms": statistics.median(windows), "windows_ms": windows, "compile_s": compile_s,
            "xla_flops": xla_flops, "memory": memory, "_compiled": compiled, "_run": run}


@contextlib.contextmanager
def ssd_as_identity():
    """While active, every Mamba-2 SSD call traced returns its input x (y = x)."""
    original = mamba2_lib.ssd

    def identity(x, *args, **kwargs):
        if kwargs.get("return_final_states"):
            b, _, h, p = x.shape
            return x, jnp.zeros((b, h, p, args[3].shape[-1]), jnp.float32)
        return x

    mamba2_lib.ssd = identity
    try:
        yield
    finally:
        mamba2_lib.ssd = original


# ------------------------------------------------------------------------------- cases

class Breakdown:
    """Builds and times the cases of one config (see the module docstring)."""

    def __init__(self, args, pairs):
        self.args = args
        self.pairs = pairs
        self.setup = tt.build_setup(args, pairs)
        s = self.setup
        self.config, self.model_cfg = s.config, s.config.model
        self.tokens_per_step = int(s.config.train.batch_size) * s.seq_len
        self.repl = mesh_lib.replicated(s.mesh)
        self.keys = [jax.device_put(jax.random.fold_in(jax.random.PRNGKey(0), i), self.repl)
                     for i in range(N_KEYS)]
        self.loss_fn = step_lib.make_loss_fn(s.task, s.parts)
        self.grads = None
        self.dtype = resolve_dtype(self.model_cfg.compute_dtype)
        self.param_dtype = resolve_dtype(s.config.train.param_dtype)
        self.rng = np.random.default_rng(1)

    def _timed(self, fn, example_args, make_run):
        a = self.args
        return time_case(fn, example_args, make_run, a.steps, a.repeats, a.warmup)

    def _random(self, shape, dtype):
        return jnp.asarray(self.rng.standard_normal(shape, np.float32), dtype)

    # -- pieces of one block
    def _block_dims(self):
        m = self.model_cfg
        d = int(m.d_model)
        d_inner = int(m.expand) * d
        nheads = d_inner // int(m.headdim)
        d_in_proj = 2 * d_inner + 2 * int(m.ngroups) * int(m.d_state) + nheads
        return d, d_inner, d_in_proj

    def case_proj(self) -> dict:
        d, d_inner, d_in_proj = self._block_dims()
        b, length = int(self.config.train.batch_size), self.setup.seq_len
        rngs = nnx.Rngs(0)
        in_proj = nnx.Linear(d, d_in_proj, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, rngs=rngs)
        out_proj = nnx.Linear(d_inner, d, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, rngs=rngs)
        gdef, params = nnx.split((in_proj, out_proj), nnx.Param)

        @jax.jit
        def fwd_bwd(params, u, v, ga, gb):
            def f(params, u, v):
                ip, op = nnx.merge(gdef, params)
                return ip(u), op(v)
            outs, vjp = jax.vjp(f, params, u, v)
            return outs, vjp((ga, gb))

        args = (params, self._random((b, length, d), self.dtype),
                self._random((b, length, d_inner), self.dtype),
                self._random((b, length, d_in_proj), self.dtype),
                self._random((b, length, d), self.dtype))
        r = self._timed(fwd_bwd, args, lambda c: (lambda i: c(*args)))
        tokens = b * length
        r["gemm_flops"] = 3 * 2.0 * tokens * (d * d_in_proj + d_inner * d)
        r["note"] = (f"one block: in_proj {d}x{d_in_proj}, out_proj {d_inner}x{d}, "
                     f"{tokens} tokens, fwd+bwd = 3 GEMMs each")
        return r

    def case_head(self) -> dict:
        s = self.setup
        b, length = int(self.config.train.batch_size), s.seq_len
        d = int(self.model_cfg.d_model)
        params = s.state.params
        tokens = s.batch["tokens"]
        mask = jnp.asarray(self.rng.random((b, length)) < 0.7)

        @jax.jit
        def fwd_bwd(params, rest, emb, scale, x, tokens, mask):
            def f(emb, scale, x):
                model = s.parts.merge({**params, "embedding": emb, "logit_scale": scale}, rest)
                logits = model.logits(x)
                ce = losses.masked_cross_entropy(logits, tokens, mask)
                acc = losses.masked_accuracy(logits, tokens, mask)
                return ce, acc
            (ce, acc), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
                emb, scale, x)
            return ce, acc, grads

        if "logit_scale" not in params:
            raise ValueError("case head needs a tied head (model.tie_embeddings=True)")
        args = (params, s.rest, params["embedding"], params["logit_scale"],
                self._random((b, length, d), jnp.float32), tokens, mask)
        r = self._timed(fwd_bwd, args, lambda c: (lambda i: c(*args)))
        vocab = s.task.tokenizer.vocab_size
        r["gemm_flops"] = 3 * 2.0 * b * length * d * vocab
        r["note"] = f"tied head {d}x{vocab} (float32 einsum) + log-softmax CE + argmax accuracy"
        return r

    def _block_case(self, identity_ssd: bool) -> dict:
        m = self.model_cfg
        b, length = int(self.config.train.batch_size), self.setup.seq_len
        d = int(m.d_model)
        block = DimbaBlock(m, dtype=self.dtype, param_dtype=self.param_dtype, rngs=nnx.Rngs(0))
        gdef, params, rest = nnx.split(block, nnx.Param, ...)

        @jax.jit
        def fwd_bwd(params, rest, h, c, gy):
            def f(params, h, c):
                return nnx.merge(gdef, params, rest)(h, c)
            y, vjp = jax.vjp(f, params, h, c)
            return y, vjp(gy)

        args = (params, rest, self._random((b, length, d), jnp.float32),
                self._random((b, d), jnp.float32), self._random((b, length, d), jnp.float32))
        ctx = ssd_as_identity() if identity_ssd else contextlib.nullcontext()
        with ctx:  # the SSD is swapped while the program is traced (in time_case's lower)
            r = self._timed(fwd_bwd, args, lambda c: (lambda i: c(*args)))
        r["note"] = (f"one DimbaBlock, ssd_impl={m.ssd_impl}" +
                     (", SSD replaced by identity" if identity_ssd else "") +
                     f"; x {int(m.n_layers)} layers in the model")
        return r

    def case_block_ssd(self) -> dict:
        return self._block_case(False)

    def case_block_no_ssd(self) -> dict:
        return self._block_case(True)

    # -- the whole model
    def _fwd_bwd_case(self, task=None) -> dict:
        s = self.setup
        loss_fn = self.loss_fn if task is None else step_lib.make_loss_fn(task, s.parts)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        params, keys = s.state.params, self.keys
        args = (params, s.rest, s.batch, keys[0])
        holder = {}

        def make_run(c):
            def run(i):
                out = c(params, s.rest, s.batch, keys[i % len(keys)])
                holder["grads"] = out[1]
                return out
            return run

        r = self._timed(grad_fn, args, make_run)
        if task is None:
            self.grads = holder.get("grads")
        r["model_flops"] = float(s.task.flops_per_token(s.seq_len)) * self.tokens_per_step
        return r

    def case_fwd_bwd(self) -> dict:
        r = self._fwd_bwd_case()
        r["note"] = "loss + grads, no optimizer; RNG key varies per call"
        return r

    def _task_with(self, key: str, value: str):
        config = ov.apply_overrides(ov.load_config_file(self.args.config),
                                    list(self.pairs) + [(key, value)])
        config.data.seq_len = self.setup.seq_len
        return make_task(config)

    def case_fwd_bwd_sc0(self) -> dict:
        r = self._fwd_bwd_case(self._task_with("diffusion.self_cond_prob", "0.0"))
        r["note"] = "fwd_bwd, self-conditioning pass never taken"
        return r

    def case_fwd_bwd_sc1(self) -> dict:
        r = self._fwd_bwd_case(self._task_with("diffusion.self_cond_prob", "1.0"))
        r["note"] = "fwd_bwd, self-conditioning pass always taken"
        return r

    def case_fwd(self) -> dict:
        s = self.setup
        fwd = jax.jit(lambda params, rest, batch, rng: self.loss_fn(params, rest, batch, rng)[0])
        keys = self.keys
        args = (s.state.params, s.rest, s.batch, keys[0])
        r = self._timed(fwd, args, lambda c: (
            lambda i: c(s.state.params, s.rest, s.batch, keys[i % len(keys)])))
        r["note"] = "the loss alone (forward, incl. the self-cond pass when its coin says so)"
        return r

    def _optimizer_case(self, params, opt_state, ema, grads, tx) -> dict:
        """`optim.apply_update` (clip + AdamW + EMA + the gradient norm) on fixed gradients,
        params / opt_state / EMA donated and threaded through the calls as the step does."""
        t = self.config.train
        decay, every = float(t.ema_decay), int(t.ema_every)

        @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
        def update(params, opt_state, ema, step, grads):
            p, o, e, norm, _ = optim.apply_update(tx, grads, opt_state, params, ema, step + 1,
                                                  decay, every)
            return p, o, e, step + 1, norm

        holder = {"state": (params, opt_state, ema, jnp.int32(0))}

        def make_run(c):
            def run(i):
                *state, norm = c(*holder["state"], grads)
                holder["state"] = tuple(state)
                return norm, state[0]
            return run

        return self._timed(update, holder["state"] + (grads,), make_run)

    def case_optimizer(self) -> dict:
        s = self.setup
        grads = self.grads
        if grads is None:
            grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), s.state.params)
        copy = functools.partial(jax.tree.map, jnp.copy)  # the train state stays usable
        r = self._optimizer_case(copy(s.state.params), copy(s.state.opt_state),
                                 copy(s.state.ema), grads, s.tx)
        r["leaves"] = len(jax.tree.leaves(s.state.params))
        r["note"] = ("clip + AdamW + EMA + grad norm over the model's parameter tree (donated, "
                     "as in the step)")
        return r

    def case_optimizer_flat(self) -> dict:
        """The same update on one float32 vector of all the parameters (one leaf): its kernels
        move the same bytes with no per-parameter launches, so optimizer - optimizer_flat is
        what the tree's leaves cost."""
        n = state_lib.count_params(self.setup.state.params)
        dtype = jnp.dtype(self.config.train.param_dtype)
        params = {"w": jnp.zeros((1, n), dtype)}  # 2-D: weight-decayed, as most parameters
        tx = optim.make_optimizer(self.config.train, params, {"w": ("mlp", None)})
        ema = None if float(self.config.train.ema_decay) <= 0 else {"w": jnp.zeros((1, n), dtype)}
        r = self._optimizer_case(params, tx.init(params), ema,
                                 {"w": jnp.full((1, n), 1e-3, dtype)}, tx)
        r["leaves"] = 1
        r["note"] = f"the same update on one {dtype.name} vector of all {n:,} parameters"
        return r

    def case_train_step(self) -> dict:
        s = self.setup

        def make_run(c):
            def run(i):  # the state is donated: s.state always holds the newest one
                s.state, metrics, _ = c(s.state, s.rest, s.batch)
                return s.state.params, metrics["loss"]
            return run

        r = self._timed(s.train_step, (s.state, s.rest, s.batch), make_run)
        r["model_flops"] = float(s.task.flops_per_token(s.seq_len)) * self.tokens_per_step
        r["note"] = "dimba_jax.train.step (state donated; fold_in(rng, step) per call)"
        return r


# --------------------------------------------------------------------------- profiling

PROFILED_CALLS = 3


def profile_case(name: str, result: dict, profile_dir: str) -> dict:
    """Traces PROFILED_CALLS calls of a timed case (its compiled program and runner) into
    profile_dir/name and returns the profile_summary of them, completeness check included."""
    compiled, run = result["_compiled"], result["_run"]
    try:
        hlo = compiled.as_text()
    except Exception:  # noqa: BLE001
        hlo = None
    case_dir = os.path.join(profile_dir, name)

    def calls():
        out = None
        for i in range(PROFILED_CALLS):
            out = run(i)
        jax.block_until_ready(out)

    jax.block_until_ready(run(0))
    wall = tt.trace_steps(case_dir, calls, hlo)
    summary = profile_summary.summarize_dir(case_dir, PROFILED_CALLS, result["ms"], hlo)
    summary["traced_call_ms"] = wall / PROFILED_CALLS * 1e3
    summary["case"] = name
    return summary


def compact_profile(summary: dict) -> dict:
    """The few numbers of a profile summary worth keeping beside a case's timing."""
    c = summary.get("completeness") or {}
    return {"complete": c.get("complete"), "instruction_coverage": c.get("instruction_coverage"),
            "captured_over_expected": c.get("captured_over_expected"),
            "kernel_ms_per_call": summary["kernel_ms_per_step"],
            "busy_ms_per_call": summary["busy_ms_per_step"],
            "idle_pct": summary["idle_pct"],
            "categories_ms": {k["category"]: k["ms_per_step"] for k in summary["categories"]}}


# ----------------------------------------------------------------------------- report

def derive(cases: dict, n_layers: int, step_ms: float | None, peak: float | None) -> dict:
    """Derived numbers from the measured cases (absent inputs -> absent outputs)."""
    ms = {k: v["ms"] for k, v in cases.items() if "ms" in v}
    out = {}

    def put(name, value, what):
        if value is not None:
            out[name] = {"ms": value, "pct_of_step": 100 * value / step_ms if step_ms else None,
                         "what": what}

    if "block_ssd" in ms and "block_no_ssd" in ms:
        per = ms["block_ssd"] - ms["block_no_ssd"]
        put("ssd_per_block", per, "block_ssd - block_no_ssd")
        put("ssd_all_blocks", per * n_layers, f"x {n_layers} blocks")
    if "block_ssd" in ms:
        put("blocks_all", ms["block_ssd"] * n_layers, f"block_ssd x {n_layers}")
    if "proj" in ms:
        put("projections_all", ms["proj"] * n_layers, f"proj x {n_layers}")
    if "fwd_bwd" in ms and "block_ssd" in ms:
        rest = ms["fwd_bwd"] - ms["block_ssd"] * n_layers - ms.get("head", 0.0)
        put("fwd_bwd_outside_blocks_and_head", rest,
            "fwd_bwd - blocks_all - head (stem, prompt encoder, self-cond pass, loss)")
    if "fwd_bwd_sc1" in ms and "fwd_bwd_sc0" in ms:
        put("self_cond_pass", ms["fwd_bwd_sc1"] - ms["fwd_bwd_sc0"], "fwd_bwd_sc1 - fwd_bwd_sc0")
    if "optimizer" in ms and "optimizer_flat" in ms:
        put("optimizer_per_leaf_cost", ms["optimizer"] - ms["optimizer_flat"],
            "optimizer - optimizer_flat (the parameter tree's leaves)")
    if "train_step" in ms and "fwd_bwd" in ms:
        put("step_minus_fwd_bwd", ms["train_step"] - ms["fwd_bwd"],
            "train_step - fwd_bwd (optimizer, EMA, norms, health checks)")
    gemm = [(cases[k]["gemm_flops"], ms[k]) for k in ("proj", "head")
            if k in ms and cases[k].get("gemm_flops")]
    if gemm:
        f, t = sum(g[0] for g in gemm), sum(g[1] for g in gemm)
        out["gemm_only_tflops"] = {"tflops": f / t / 1e9,
                                   "pct_of_peak": 100 * f / t * 1e3 / peak if peak else None,
                                   "what": "analytic GEMM FLOPs / time of proj + head"}
    return out


def to_markdown(report: dict) -> str:
    """Markdown of a report (see write)."""
    s = report["setup"]
    step = report.get("step_ms")
    peak = s["peak_tflops"]
    peak_text = "—" if not peak else f"{peak:.0f}"
    lines = [f"# Step breakdown: {s['config']} {s['overrides']}".rstrip(), "",
             f"{s['device']} x {s['devices']}, batch {s['global_batch']} x seq {s['seq_len']} "
             f"({s['tokens_per_step']:,} tokens/step), compute {s['compute_dtype']}, "
             f"ssd_impl {s['ssd_impl']}, {s['n_layers']} layers, jax {s['jax']}. Reference step "
             + ("— (no train_step case, no --step-ms)" if step is None else
                f"{step:.1f} ms ({report.get('step_ms_from')})") + ". "
             f"Peak {peak_text} TFLOP/s per device.", "",
             "| case | ms | % of step | XLA TFLOP/s | GEMM TFLOP/s (% peak) | compile s | what |",
             "|---|---|---|---|---|---|---|"]
    for name, c in report["cases"].items():
        if "ms" not in c:
            continue
        pct = f"{100 * c['ms'] / step:.1f}" if step else "—"
        xla = f"{c['xla_flops'] / c['ms'] / 1e9:.3g}" if c.get("xla_flops") else "—"
        gemm = "—"
        if c.get("gemm_flops"):
            tf = c["gemm_flops"] / c["ms"] / 1e9
            gemm = f"{tf:.3g}" + (f" ({100 * tf / peak:.0f}%)" if peak else "")
        note = c.get("note", "")
        prof = c.get("profile")
        if prof:
            cov = prof["instruction_coverage"]
            note += (f"; profiled: kernels {prof['kernel_ms_per_call']:.2f} ms/call, idle "
                     f"{prof['idle_pct']:.0f}%, " +
                     ("trace COMPLETE" if prof["complete"] else "trace INCOMPLETE") +
                     ("" if cov is None else f" ({100 * cov:.0f}% of HLO kernels seen)"))
        lines.append(f"| {name} | {c['ms']:.2f} | {pct} | {xla} | {gemm} | "
                     f"{c['compile_s']:.1f} | {note} |")
    if report["derived"]:
        lines += ["", "| derived | ms | % of step | from |", "|---|---|---|---|"]
        for name, v in report["derived"].items():
            if "ms" in v:
                pct = "—" if v["pct_of_step"] is None else f"{v['pct_of_step']:.1f}"
                lines.append(f"| {name} | {v['ms']:.2f} | {pct} | {v['what']} |")
            else:
                pk = "—" if v["pct_of_peak"] is None else f"{v['pct_of_peak']:.0f}%"
                lines.append(f"| {name} | {v['tflops']:.3g} TFLOP/s ({pk} of peak) | | "
                             f"{v['what']} |")
    mf = report["cases"].get("fwd_bwd", {})
    if mf.get("model_flops") and mf.get("ms"):
        lines += ["", f"fwd_bwd reaches {mf['model_flops'] / mf['ms'] / 1e9:.3g} model TFLOP/s "
                  "(task.flops_per_token x tokens / time)."]
    if report["failed"]:
        lines += ["", "Failed / skipped:", ""] + [f"- {k}: {v}"
                                                  for k, v in report["failed"].items()]
    lines += ["", "Command:", "", f"    {report['command']}"]
    return "\n".join(lines) + "\n"


def write(prefix: str, report: dict) -> None:
    """PREFIX.json (the report) and PREFIX.md (to_markdown)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(to_markdown(report))


def write_profiles(prefix: str, profiles: list[dict]) -> None:
    """PREFIX_profile.json ({"profiles": [...]}) and PREFIX_profile.md (one section per case)."""
    with open(prefix + "_profile.json", "w") as f:
        json.dump({"profiles": profiles}, f, indent=1)
    with open(prefix + "_profile.md", "w") as f:
        for p in profiles:
            f.write(profile_summary.to_markdown(p, f"Profile: case {p['case']}") + "\n")


def main(argv=None) -> dict:
    """Runs the cases; returns the report {"setup", "cases", "derived", "failed", ...}."""
    argv = sys.argv[1:] if argv is None else argv
    args, pairs = parse_args(argv)
    t_start = time.perf_counter()
    bd = Breakdown(args, pairs)
    s, cfg = bd.setup, bd.config
    peak = flops_lib.peak_flops_per_device(s.devices[0], float(cfg.train.peak_flops))
    report = {
        "setup": {"config": args.config, "overrides": " ".join(f"{k}={v}" for k, v in pairs),
                  "device": s.devices[0].device_kind, "devices": len(s.devices),
                  "global_batch": int(cfg.train.batch_size), "seq_len": s.seq_len,
                  "tokens_per_step": bd.tokens_per_step,
                  "compute_dtype": cfg.model.compute_dtype, "ssd_impl": cfg.model.ssd_impl,
                  "n_layers": int(cfg.model.n_layers),
                  "peak_tflops": peak / 1e12 if peak else None, "jax": jax.__version__,
                  "setup_s": time.perf_counter() - t_start},
        "cases": {}, "derived": {}, "failed": {},
        "step_ms": args.step_ms or None, "step_ms_from": "--step-ms" if args.step_ms else None,
        "command": " ".join(["python -m benchmarks.step_breakdown"] + [shlex.quote(a) for a in argv]),
    }
    longest = 0.0
    profiles = []
    for i, name in enumerate(args.cases):
        elapsed = time.perf_counter() - t_start
        if args.budget_s and elapsed + longest > args.budget_s:
            for rest in args.cases[i:]:
                report["failed"][rest] = (f"not started: {elapsed:.0f}s elapsed + longest case "
                                          f"{longest:.0f}s > budget {args.budget_s:.0f}s")
            print(f"[budget] not starting {', '.join(args.cases[i:])}", flush=True)
            break
        print(f"[case {name}]", flush=True)
        t0 = time.perf_counter()
        try:
            result = getattr(bd, f"case_{name}")()
            report["cases"][name] = {k: v for k, v in result.items() if not k.startswith("_")}
            print(json.dumps({name: {k: v for k, v in report["cases"][name].items()
                                     if k != "memory"}}), flush=True)
            if args.profile_dir and name in args.profile_cases:
                try:
                    summary = profile_case(name, result, args.profile_dir)
                    profiles.append(summary)
                    report["cases"][name]["profile"] = compact_profile(summary)
                except Exception as e:  # noqa: BLE001 - a profile is extra; keep the timing
                    traceback.print_exc()
                    report["failed"][f"profile {name}"] = f"{type(e).__name__}: {str(e)[:400]}"
            result = None
        except Exception as e:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            report["failed"][name] = f"{type(e).__name__}: {str(e)[:400]}"
        longest = max(longest, time.perf_counter() - t0)
        gc.collect()
        if "train_step" in report["cases"]:
            report["step_ms"] = report["cases"]["train_step"]["ms"]
            report["step_ms_from"] = "train_step case"
        report["derived"] = derive(report["cases"], int(cfg.model.n_layers), report["step_ms"],
                                   peak)
        report["elapsed_s"] = time.perf_counter() - t_start
        if args.out:
            write(args.out, report)
            if profiles:
                write_profiles(args.out, profiles)
    for summary in profiles:
        print(profile_summary.to_markdown(summary, f"Profile: case {summary['case']}"), flush=True)
    print(to_markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
