"""Training throughput (tokens/s) and model-FLOPs utilisation of a config on the local devices.

    python -m benchmarks.train_throughput --config configs/base.py --per-device-batch 16 \
        --steps 20 --out benchmarks/results/train_throughput_h200
    # weak scaling: the same per-device batch on 2 / 4 GPUs (rows are merged into --out;
    # run with 1, 2 and 4):
    python -m benchmarks.train_throughput --config configs/base.py --per-device-batch 16 \
        --devices 4 --mesh data=2,fsdp=2 --out benchmarks/results/scaling_h200

It times the real jitted train step of dimba_jax.train.step (sharded over the config's mesh,
state donated, AdamW, EMA) on synthetic tokens (uniform random ids: the input pipeline is not
timed). Warm-up steps (compilation included) are not timed; then `--steps` steps are dispatched
back to back and the clock stops when the last one is done; the median of `--repeats` such
windows is reported. MFU = tokens/s x the task's training FLOPs per token (documented count,
dimba_jax/models/flops.py) / (peak bf16 FLOP/s per device x devices). XLA's own FLOP count of
the compiled step and its memory use are recorded beside it.

Variants (several measurements in one process, e.g. MFU levers in one GPU call):
    python -m benchmarks.train_throughput --config configs/base.py --steps 10 --repeats 3 \
        --warmup 2 --budget-s 200 --variant baseline: --variant pallas:model.ssd_impl=pallas \
        --variant b32:per_device_batch=32 --out $OUT/train_throughput_h200
    # the fused epilogue and prologue of the bidirectional mixer (on by default on a GPU,
    # model.norm_impl / model.conv_impl "auto") against XLA's:
    python -m benchmarks.train_throughput --config configs/base.py --steps 10 --repeats 3 \
        --warmup 2 --variant xla:model.conv_impl=xla,model.norm_impl=xla \
        --variant fusednorm:model.conv_impl=xla,model.norm_impl=pallas \
        --variant fusedconv:model.conv_impl=pallas,model.norm_impl=xla \
        --variant both:model.conv_impl=pallas,model.norm_impl=pallas --out PREFIX
`--variant NAME:KEY=VALUE,KEY=VALUE` (repeatable; an empty list after the colon = the base
settings). KEY is a config key (`model.ssd_impl`, `train.grad_accum`, ...) or one of the
measurement settings `per_device_batch`, `seq_len`. Variants run in order; one that fails is
recorded (its error) and the next one runs; `--budget-s` stops starting new variants once the
elapsed time plus the longest variant so far would pass it. Without --variant one row is measured.

Mesh: `--mesh data=2,fsdp=2` (axes not named are 1; `-1` = the remaining devices) sets
config.mesh; the default is the config's mesh (data = all devices). Weak scaling keeps
--per-device-batch fixed while `--devices N` grows (weak scaling).

Profiling: `--profile-dir DIR` records a jax.profiler trace of 3 steps of each variant named in
`--profile-variants` (default: the first) under DIR/<variant>, and writes a per-kernel summary
of all of them (benchmarks.profile_summary: kernel time per step, top kernels, categories,
idle gap, and a completeness check against the compiled HLO, saved as
DIR/<variant>/program.hlo.txt) to PREFIX_profile.json + PREFIX_profile.md. The trace uses
`profiler_options()`: no Python tracer, CUPTI event caps raised through
ProfileOptions.advanced_configuration (GPU only; keys gpu_max_activity_api_events,
gpu_max_callback_api_events, gpu_max_annotation_strings), TF_PROFILER_TRACE_VIEWER_MAX_EVENTS
raised while the trace JSON is written. For per-kernel GPU traces prefer XLA command buffers off
(XLA_FLAGS=--xla_gpu_enable_command_buffer=); the step time is then measured that way too.

Output: PREFIX.json ({"rows": [...], "failed": [...]} merged across invocations, keyed by
config, overrides, devices, batch, seq_len and mesh) and PREFIX.md (a table of all rows), plus the
exact command in each row. Results are written after every variant (partial results survive a
timeout).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import itertools
import json
import os
import shlex
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile_summary
from dimba_jax.models import flops as flops_lib
from dimba_jax.train import mesh as mesh_lib
from dimba_jax.train import overrides as ov
from dimba_jax.train import state as state_lib
from dimba_jax.train import step as step_lib
from dimba_jax.train.tasks import make_task


def _command() -> str:
    """The command line of this process, as the module invocation (recorded in every row)."""
    return "python -m benchmarks.train_throughput " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def parse_args(argv):
    rest, pairs = ov.split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--per-device-batch", type=int, default=16, help="sequences per device per step")
    p.add_argument("--seq-len", type=int, default=0, help="0 = config.data.seq_len")
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0 = all)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (incl. compile)")
    p.add_argument("--mesh", default="", help="mesh sizes, e.g. data=2,fsdp=2 (others 1)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:KEY=VALUE,KEY=VALUE (repeatable); KEY = config key or "
                        "per_device_batch / seq_len")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="do not start a variant that would end past this many seconds (0 = no bound)")
    p.add_argument("--profile-dir", default="", help="write a jax.profiler trace of 3 steps here")
    p.add_argument("--profile-variants", default="",
                   help="comma-separated variant names to profile; 'all'; default: the first")
    p.add_argument("--hlo-dir", default="",
                   help="write each compiled step program's optimized HLO here, gzipped text "
                        "(VARIANT_K.hlo.txt.gz: which ops XLA fused into which kernels)")
    p.add_argument("--out", default="", help="output prefix: PREFIX.json + PREFIX.md")
    args = p.parse_args(rest)
    if args.per_device_batch < 1 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--per-device-batch, --steps and --repeats must be >= 1")
    return args, pairs


MEASUREMENT_KEYS = ("per_device_batch", "seq_len")


def parse_mesh(text: str) -> list[tuple[str, str]]:
    """"data=2,fsdp=2" -> config overrides [("mesh.data", "2"), ("mesh.fsdp", "2"),
    ("mesh.tensor", "1")] (axes not named are 1). "" -> [].

    Raises:
      ValueError: an unknown axis or a malformed item.
    """
    if not text:
        return []
    sizes = {"data": "1", "fsdp": "1", "tensor": "1"}
    for item in text.split(","):
        axis, eq, value = item.partition("=")
        axis = axis.strip()
        if not eq or axis not in sizes:
            raise ValueError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS in "
                             f"{sorted(sizes)}")
        int(value)  # ValueError on a non-integer
        sizes[axis] = value.strip()
    return [(f"mesh.{a}", v) for a, v in sizes.items()]


def parse_variant(text: str) -> tuple[str, list[tuple[str, str]]]:
    """"NAME:KEY=VALUE,KEY=VALUE" -> (NAME, [(KEY, VALUE), ...]); "NAME" or "NAME:" -> no overrides.

    Raises:
      ValueError: an empty name or an item without "=".
    """
    name, _, body = text.partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"--variant {text!r}: needs a NAME of letters, digits, _ . - "
                         "before the colon")
    pairs = []
    for item in filter(None, (i.strip() for i in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--variant {text!r}: item {item!r} is not KEY=VALUE")
        pairs.append((key.strip().removeprefix("--config.").removeprefix("config."),
                      value.strip()))
    return name, pairs


def variant_settings(args, pairs: list[tuple[str, str]]) -> tuple[argparse.Namespace, list]:
    """Splits a variant's pairs into measurement settings (a copy of `args`) and config overrides."""
    vargs = argparse.Namespace(**vars(args))
    config_pairs = []
    for key, value in pairs:
        if key in MEASUREMENT_KEYS:
            setattr(vargs, key, int(value))
        else:
            config_pairs.append((key, value))
    return vargs, config_pairs


class TrainSetup(argparse.Namespace):
    """What `build_setup` returns (attributes): config, task, devices, mesh, parts, tx,
    shardings, rest_shardings, state, rest, data_sharding, train_step, batch, seq_len."""


def build_setup(args, pairs) -> TrainSetup:
    """The config (file + overrides, batch = per_device_batch x devices), task, mesh, sharded
    train state and jitted train step of `args`, plus one synthetic batch.

    Args:
      args: needs .config (path), .per_device_batch, .seq_len (0 = config's), .devices (0 = all).
      pairs: [(config key, value string)] overrides.
    Returns:
      TrainSetup; batch = {"tokens": int32 (global_batch, seq_len)} uniform random ids (seed 0),
      sharded like the data.
    """
    config = ov.apply_overrides(ov.load_config_file(args.config), pairs)
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    n = len(devices)
    seq_len = args.seq_len or int(config.data.seq_len)
    config.data.seq_len = seq_len
    config.train.batch_size = args.per_device_batch * n
    config.train.steps = max(config.train.steps, 10_000)  # lr schedule irrelevant here

    task = make_task(config)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    layout = state_lib.param_layout(parts, config.train, mesh, config.mesh.axis_rules)
    tx = state_lib.optimizer_for(parts, config.train, layout)
    pdtype = jnp.dtype(config.train.param_dtype)
    use_ema = float(config.train.ema_decay) > 0
    sh, rsh = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules, pdtype, use_ema,
                                        layout)
    state, rest = state_lib.create_train_state(task, parts, tx, 0, sh, rsh, pdtype, use_ema,
                                               layout)
    ds = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
    train_step = step_lib.make_train_step(task, parts, tx, config.train, mesh, sh, rsh, ds,
                                          layout)
    vocab = task.tokenizer.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab - 1, (config.train.batch_size, seq_len))
    batch = {"tokens": jax.device_put(tokens.astype(np.int32), ds)}
    return TrainSetup(config=config, task=task, devices=devices, mesh=mesh, parts=parts, tx=tx,
                      shardings=sh, rest_shardings=rsh, state=state, rest=rest,
                      data_sharding=ds, train_step=train_step, batch=batch, seq_len=seq_len)


def write_hlo(directory: str, name: str, programs) -> list[str]:
    """Writes each compiled program's optimized HLO text, gzipped, as
    directory/NAME_K.hlo.txt.gz (K: the index of its step options). Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, compiled in enumerate(programs):
        path = os.path.join(directory, f"{name}_{k}.hlo.txt.gz")
        with gzip.open(path, "wt") as f:
            f.write(compiled.as_text())
        paths.append(path)
    return paths


def compiled_costs(compiled) -> tuple[float | None, dict]:
    """(XLA's FLOP count of one call of a compiled program or None, memory {"temp_gib",
    "argument_gib", "output_gib"} or {}) — whatever the backend reports."""
    xla_flops, memory = None, {}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    try:
        m = compiled.memory_analysis()
        memory = {"temp_gib": m.temp_size_in_bytes / 2**30,
                  "argument_gib": m.argument_size_in_bytes / 2**30,
                  "output_gib": m.output_size_in_bytes / 2**30}
    except Exception:  # noqa: BLE001
        pass
    return xla_flops, memory


# Largest event counts the GPU (CUPTI) tracer keeps; XLA's defaults are 2M each (jax
# docs/profiling.md, "GPU options"; xla/backends/profiler/gpu/cupti_tracer_options_utils.cc).
# An unknown key makes the GPU tracer refuse to start, so only keys documented for jax 0.10/0.11
# are used. gpu_enable_cupti_activity_graph_trace is deliberately NOT set: CUPTI's graph trace
# records one event per CUDA graph *instead of* its kernels. For per-kernel traces run with XLA
# command buffers off (XLA_FLAGS=--xla_gpu_enable_command_buffer=), as jax itself does when it
# profiles for PGLE (jax/_src/compiler.py).
GPU_MAX_EVENTS = 16 * 1024 * 1024
# The Chrome-trace JSON that jax writes beside the .xplane.pb keeps only the earliest
# TF_PROFILER_TRACE_VIEWER_MAX_EVENTS events (default 1,000,000); raised while exporting.
TRACE_VIEWER_MAX_EVENTS = 50_000_000


def profiler_options():
    """jax.profiler.ProfileOptions for a complete device trace, or None on a jax without them.

    python_tracer_level 0 (Python frames only bloat the trace); raise_error_on_start_failure
    (so that a refused option is noticed, see trace_steps); on GPU, advanced_configuration
    raises the CUPTI event caps gpu_max_activity_api_events, gpu_max_callback_api_events and
    gpu_max_annotation_strings to GPU_MAX_EVENTS.
    """
    try:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0
    except Exception:  # noqa: BLE001 - older jax: default options
        return None
    if hasattr(options, "raise_error_on_start_failure"):
        options.raise_error_on_start_failure = True
    if jax.default_backend() == "gpu" and hasattr(options, "advanced_configuration"):
        try:
            options.advanced_configuration = {
                "gpu_max_activity_api_events": GPU_MAX_EVENTS,
                "gpu_max_callback_api_events": GPU_MAX_EVENTS,
                "gpu_max_annotation_strings": GPU_MAX_EVENTS}
        except Exception as e:  # noqa: BLE001 - a jaxlib that cannot take them: defaults
            print(f"[profile] advanced_configuration not accepted ({e}); default caps",
                  flush=True)
    return options


def trace_steps(profile_dir: str, run_steps, hlo_text: str | None = None) -> float:
    """Traces `run_steps()` (which must block until its work is done) into `profile_dir` with
    `profiler_options()`; writes the program's HLO text beside it (profile_dir/program.hlo.txt,
    for profile_summary's completeness check). Falls back to default options if the profiler
    refuses the advanced ones. Returns the wall seconds of run_steps()."""
    os.makedirs(profile_dir, exist_ok=True)
    if hlo_text:
        with open(os.path.join(profile_dir, "program.hlo.txt"), "w") as f:
            f.write(hlo_text)
    options = profiler_options()
    kwargs = {"profiler_options": options} if options is not None else {}
    try:
        jax.profiler.start_trace(profile_dir, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. an advanced key this jaxlib rejects
        print(f"[profile] start_trace with options failed ({type(e).__name__}: {e}); "
              "retrying with defaults", flush=True)
        try:
            jax.profiler.stop_trace()  # a half-started session blocks the next start
        except Exception:  # noqa: BLE001
            pass
        jax.profiler.start_trace(profile_dir)
    t0 = time.perf_counter()
    try:
        run_steps()
    finally:
        wall = time.perf_counter() - t0
        previous = os.environ.get("TF_PROFILER_TRACE_VIEWER_MAX_EVENTS")
        os.environ["TF_PROFILER_TRACE_VIEWER_MAX_EVENTS"] = str(TRACE_VIEWER_MAX_EVENTS)
        try:
            jax.profiler.stop_trace()
        finally:
            if previous is None:
                os.environ.pop("TF_PROFILER_TRACE_VIEWER_MAX_EVENTS", None)
            else:
                os.environ["TF_PROFILER_TRACE_VIEWER_MAX_EVENTS"] = previous
    return wall


def measure(args, pairs, profile_dir: str = "", variant: str = "",
            measurement_pairs=()) -> dict:
    """Builds the sharded train step for the config and times it. Returns one result row.

    With `profile_dir`, also traces 3 more steps there and adds row["profile"] (the
    profile_summary of them, its step wall time = the measured median step).
    """
    s = build_setup(args, pairs)
    config, task, devices, mesh, parts = s.config, s.task, s.devices, s.mesh, s.parts
    state, rest, batch, train_step, seq_len = s.state, s.rest, s.batch, s.train_step, s.seq_len
    n = len(devices)

    # the task's static step options (the host's self-conditioning coin): every compiled
    # variant is built and run before timing; the timed steps take each step's own options
    option_sets = step_lib.step_option_sets(task)
    counter = itertools.count(1)

    def one_step(st, options=None):
        opts = step_lib.step_options(task, next(counter)) if options is None else options
        return train_step(st, rest, batch, opts)

    # every variant compiled concurrently (one of configs/base.py's two took 61.9 s on one
    # H100, vs_mamba_ssm_record6_h100.json); compile_s covers all of it.
    t_compile = time.perf_counter()
    programs = step_lib.compile_variants(train_step, state, rest, batch, option_sets)
    compile_s = time.perf_counter() - t_compile
    if getattr(args, "hlo_dir", ""):
        write_hlo(args.hlo_dir, variant or "base", programs)
    compiled = programs[-1]
    xla_flops, memory = compiled_costs(compiled)

    t0 = time.perf_counter()
    for options in option_sets:
        state, metrics, _ = one_step(state, options)
    for _ in range(max(1, args.warmup)):
        state, metrics, _ = one_step(state)
    loss = float(metrics["loss"])
    warm_s = time.perf_counter() - t0
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} during warm-up")

    windows = []
    for _ in range(args.repeats):
        jax.block_until_ready(state.params)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics, _ = one_step(state)
        jax.block_until_ready((state.params, metrics["loss"]))
        windows.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(windows)
    profile = None
    if profile_dir:
        profiled_steps = 3
        jax.block_until_ready(state.params)
        try:
            hlo_text = compiled.as_text()
        except Exception:  # noqa: BLE001
            hlo_text = None
        holder = {"state": state}

        def run_steps():
            st = holder["state"]
            for _ in range(profiled_steps):
                st, m, _ = one_step(st)
            jax.block_until_ready((st.params, m["loss"]))
            holder["state"] = st

        traced_ms = trace_steps(profile_dir, run_steps, hlo_text) / profiled_steps * 1e3
        state = holder["state"]
        profile = profile_summary.summarize_dir(profile_dir, profiled_steps, step_s * 1e3,
                                                hlo_text)
        profile["traced_step_ms"] = traced_ms
        profile["variant"] = variant
    tokens_per_step = config.train.batch_size * seq_len
    tps = tokens_per_step / step_s
    fpt = float(task.flops_per_token(seq_len))
    peak = flops_lib.peak_flops_per_device(devices[0], float(config.train.peak_flops))
    overrides = list(measurement_pairs) + list(pairs)
    row = {
        "variant": variant,
        "config": args.config, "overrides": " ".join(f"{k}={v}" for k, v in overrides),
        "task": config.task, "device": devices[0].device_kind,
        "devices": n, "mesh": dict(mesh.shape), "per_device_batch": args.per_device_batch,
        "global_batch": config.train.batch_size, "seq_len": seq_len,
        "compute_dtype": config.model.compute_dtype, "ssd_impl": config.model.ssd_impl,
        "norm_impl": config.model.norm_impl, "conv_impl": config.model.conv_impl,
        "params": state_lib.count_params(parts.abstract_params),
        "step_ms": step_s * 1e3, "step_ms_windows": [w * 1e3 for w in windows],
        "tokens_per_s": tps, "tokens_per_s_per_device": tps / n,
        "train_flops_per_token": fpt, "model_tflops_per_s": tps * fpt / 1e12,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": flops_lib.mfu(tps, fpt, n, peak),
        # cost_analysis of an SPMD program counts one device's share: x n for the whole step.
        "xla_flops_per_token": (xla_flops * n / tokens_per_step) if xla_flops else None,
        "memory": memory, "compile_s": compile_s, "warmup_s": warm_s,
        "loss_after_warmup": loss,
        "jax": jax.__version__,
        "command": _command(),
    }
    if profile is not None:
        row["profile"] = {
            "kernel_ms_per_step": profile["kernel_ms_per_step"],
            "busy_ms_per_step": profile["busy_ms_per_step"],
            "idle_ms_per_step": profile["idle_ms_per_step"],
            "categories_ms": {c["category"]: c["ms_per_step"] for c in profile["categories"]},
        }
        row["_profile_full"] = profile
    return row


def _row_key(r: dict) -> tuple:
    return (r["config"], r.get("overrides", ""), r["devices"], r["per_device_batch"],
            r["seq_len"], json.dumps(r["mesh"], sort_keys=True))


def _scaling_key(r: dict) -> tuple:
    """Rows that differ only in device count and mesh compare with each other (weak scaling)."""
    overrides = " ".join(t for t in r.get("overrides", "").split() if not t.startswith("mesh."))
    return (r["config"], overrides, r["per_device_batch"], r["seq_len"])


def write(prefix: str, row: dict | None = None, failure: dict | None = None) -> None:
    """Merges `row` (a measured row) or `failure` ({"variant", "overrides", "error", "command"})
    into PREFIX.json (a row with the same config/overrides/devices/batch/seq_len/mesh is
    replaced) and rewrites PREFIX.md from all rows."""
    path = prefix + ".json"
    data = {"rows": [], "failed": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("rows", [])
    data.setdefault("failed", [])
    if row is not None:
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        data["rows"] = [r for r in data["rows"] if _row_key(r) != _row_key(row)] + [row]
        data["failed"] = [f for f in data["failed"]
                          if (f.get("config"), f.get("overrides")) !=
                          (row["config"], row.get("overrides", ""))]
    if failure is not None:
        data["failed"] = [f for f in data["failed"]
                          if (f.get("config"), f.get("overrides")) !=
                          (failure.get("config"), failure.get("overrides"))] + [failure]
    data["rows"].sort(key=lambda r: (r["config"], r["seq_len"], r["devices"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    base = {}
    for r in data["rows"]:
        if r["devices"] == 1:
            base[_scaling_key(r)] = r["tokens_per_s"]
    lines = ["| variant | config | device | devices | mesh | batch/dev x seq | params | step ms | "
             "tokens/s | tokens/s/device | scaling vs 1 (efficiency) | MFU | XLA/model FLOPs | "
             "kernel busy / idle ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        one = base.get(_scaling_key(r))
        r["scaling_vs_1"] = r["tokens_per_s"] / one if one else None
        r["scaling_efficiency"] = r["tokens_per_s"] / one / r["devices"] if one else None
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    for r in data["rows"]:
        one = base.get(_scaling_key(r))
        scale = (f"{r['tokens_per_s'] / one:.2f}x ({100 * r['tokens_per_s'] / one / r['devices']:.0f}%)"
                 if one else "—")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        ratio = (f"{r['xla_flops_per_token'] / r['train_flops_per_token']:.2f}"
                 if r.get("xla_flops_per_token") else "—")
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        name = r["config"] + (f" {r['overrides']}" if r.get("overrides") else "")
        prof = r.get("profile")
        busy = (f"{prof['busy_ms_per_step']:.1f} / {prof['idle_ms_per_step']:.1f}"
                if prof else "—")
        lines.append(f"| {r.get('variant') or '—'} | {name} | {r['device']} | {r['devices']} | "
                     f"{mesh} | {r['per_device_batch']}x{r['seq_len']} | "
                     f"{r['params'] / 1e6:.1f}M | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / r['devices']:,.0f} | "
                     f"{scale} | {mfu} | {ratio} | {busy} |")
    if data["failed"]:
        lines += ["", "Failed:", ""] + [
            f"- {f.get('variant') or '—'} ({f.get('overrides') or 'base'}): {f['error']}"
            for f in data["failed"]]
    lines += ["", "Commands:", ""] + sorted({f"    {r['command']}" for r in data["rows"]})
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def write_profiles(prefix: str, profiles: list[dict]) -> None:
    """All variants' profile summaries -> PREFIX_profile.json ({"profiles": [...]}) + .md."""
    with open(prefix + "_profile.json", "w") as f:
        json.dump({"profiles": profiles}, f, indent=1)
    with open(prefix + "_profile.md", "w") as f:
        for p in profiles:
            f.write(profile_summary.to_markdown(
                p, f"Profile: variant {p.get('variant') or 'base'}") + "\n")


def main(argv=None):
    """Measures every variant (or the base settings once); returns the rows measured."""
    args, pairs = parse_args(sys.argv[1:] if argv is None else argv)
    base_pairs = pairs + parse_mesh(args.mesh)
    variants = [parse_variant(v) for v in args.variant] or [("", [])]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must be unique, got {names}")
    wanted = {n.strip() for n in args.profile_variants.split(",") if n.strip()}
    if wanted - {"all"} - set(names):
        raise ValueError(f"--profile-variants {sorted(wanted - set(names))} are not variants "
                         f"({names})")
    t_start = time.perf_counter()
    longest = 0.0
    rows, profiles = [], []
    for i, (name, vpairs) in enumerate(variants):
        elapsed = time.perf_counter() - t_start
        if args.budget_s and i > 0 and elapsed + longest > args.budget_s:
            print(f"[budget] {elapsed:.0f}s elapsed, longest variant {longest:.0f}s, budget "
                  f"{args.budget_s:.0f}s: not starting {', '.join(names[i:])}", flush=True)
            break
        vargs, config_pairs = variant_settings(args, vpairs)
        measurement_pairs = [(k, v) for k, v in vpairs if k in MEASUREMENT_KEYS]
        profile = bool(args.profile_dir) and (
            "all" in wanted or name in wanted or (not wanted and i == 0))
        pdir = os.path.join(args.profile_dir, name or "base") if profile else ""
        print(f"[variant {name or 'base'}] {' '.join(f'{k}={v}' for k, v in vpairs) or 'base'}",
              flush=True)
        t0 = time.perf_counter()
        try:
            row = measure(vargs, base_pairs + config_pairs, pdir, name, measurement_pairs)
        except Exception as e:  # noqa: BLE001 - record and go on with the next variant
            import traceback
            traceback.print_exc()
            failure = {"variant": name, "config": args.config,
                       "overrides": " ".join(f"{k}={v}" for k, v in
                                             measurement_pairs + base_pairs + config_pairs),
                       "error": f"{type(e).__name__}: {str(e)[:500]}",
                       "command": _command()}
            print(json.dumps(failure), flush=True)
            if args.out:
                write(args.out, failure=failure)
            row = None
        longest = max(longest, time.perf_counter() - t0)
        gc.collect()
        if row is None:
            continue
        full = row.get("_profile_full")
        printable = {k: v for k, v in row.items() if not k.startswith("_")}
        print(json.dumps(printable, indent=1), flush=True)
        if full is not None:
            profiles.append(full)
            print(profile_summary.to_markdown(full, f"Profile: variant {name or 'base'}"),
                  flush=True)
        if args.out:
            write(args.out, printable)
            if profiles:
                write_profiles(args.out, profiles)
        rows.append(printable)
    return rows


if __name__ == "__main__":
    main()
