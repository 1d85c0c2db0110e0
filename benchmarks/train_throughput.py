"""Training throughput (tokens/s) and model-FLOPs utilisation of a config on the local devices.

    python benchmarks/train_throughput.py --config configs/base.py --per-device-batch 16 \
        --steps 20 --out benchmarks/results/train_throughput_h200
    # weak scaling: the same per-device batch on 2 / 4 GPUs (rows are merged into --out):
    python benchmarks/train_throughput.py --config configs/base.py --per-device-batch 16 \
        --devices 2 --out benchmarks/results/train_throughput_h200 --config.mesh.fsdp=2 --config.mesh.data=1

It times the real jitted train step of dimba_jax.train.step (sharded over the config's mesh,
state donated, AdamW, EMA) on synthetic tokens (uniform random ids: the input pipeline is not
timed). Warm-up steps (compilation included) are not timed; then `--steps` steps are dispatched
back to back and the clock stops when the last one is done; the median of `--repeats` such
windows is reported. MFU = tokens/s x the task's training FLOPs per token (documented count,
dimba_jax/train/flops.py) / (peak bf16 FLOP/s per device x devices). XLA's own FLOP count of
the compiled step and its memory use are recorded beside it.

Output: PREFIX.json ({"rows": [...]} merged across invocations, keyed by config, devices,
batch and seq_len) and PREFIX.md (a table of all rows), plus the exact command in each row.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimba_jax.train import flops as flops_lib  # noqa: E402
from dimba_jax.train import mesh as mesh_lib  # noqa: E402
from dimba_jax.train import optim  # noqa: E402
from dimba_jax.train import overrides as ov  # noqa: E402
from dimba_jax.train import state as state_lib  # noqa: E402
from dimba_jax.train import step as step_lib  # noqa: E402
from dimba_jax.train.tasks import make_task  # noqa: E402


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
    p.add_argument("--profile-dir", default="", help="write a jax.profiler trace of 3 steps here")
    p.add_argument("--out", default="", help="output prefix: PREFIX.json + PREFIX.md")
    args = p.parse_args(rest)
    return args, pairs


def measure(args, pairs) -> dict:
    """Builds the sharded train step for the config and times it. Returns one result row."""
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
    tx = optim.make_optimizer(config.train, parts.abstract_params, parts.logical_axes)
    pdtype = jnp.dtype(config.train.param_dtype)
    use_ema = float(config.train.ema_decay) > 0
    sh, rsh = state_lib.state_shardings(parts, tx, mesh, config.mesh.axis_rules, pdtype, use_ema)
    state, rest = state_lib.create_train_state(task, parts, tx, 0, sh, rsh, pdtype, use_ema)
    ds = step_lib.batch_sharding(mesh, config.mesh.axis_rules)
    train_step = step_lib.make_train_step(task, parts, tx, config.train, mesh, sh, rsh, ds)
    vocab = task.tokenizer.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab - 1, (config.train.batch_size, seq_len))
    batch = {"tokens": jax.device_put(tokens.astype(np.int32), ds)}

    compiled = train_step.lower(state, rest, batch).compile()
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

    t0 = time.perf_counter()
    for _ in range(max(1, args.warmup)):
        state, metrics, _ = train_step(state, rest, batch)
    loss = float(metrics["loss"])
    warm_s = time.perf_counter() - t0
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} during warm-up")

    windows = []
    for _ in range(args.repeats):
        jax.block_until_ready(state.params)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics, _ = train_step(state, rest, batch)
        jax.block_until_ready((state.params, metrics["loss"]))
        windows.append((time.perf_counter() - t0) / args.steps)
    if args.profile_dir:
        jax.profiler.start_trace(args.profile_dir)
        for _ in range(3):
            state, metrics, _ = train_step(state, rest, batch)
        jax.block_until_ready(metrics["loss"])
        jax.profiler.stop_trace()

    step_s = statistics.median(windows)
    tokens_per_step = config.train.batch_size * seq_len
    tps = tokens_per_step / step_s
    fpt = float(task.flops_per_token(seq_len))
    peak = flops_lib.peak_flops_per_device(devices[0], float(config.train.peak_flops))
    return {
        "config": args.config, "overrides": " ".join(f"{k}={v}" for k, v in pairs),
        "task": config.task, "device": devices[0].device_kind,
        "devices": n, "mesh": dict(mesh.shape), "per_device_batch": args.per_device_batch,
        "global_batch": config.train.batch_size, "seq_len": seq_len,
        "compute_dtype": config.model.compute_dtype, "ssd_impl": config.model.ssd_impl,
        "params": state_lib.count_params(parts.abstract_params),
        "step_ms": step_s * 1e3, "step_ms_windows": [w * 1e3 for w in windows],
        "tokens_per_s": tps, "tokens_per_s_per_device": tps / n,
        "train_flops_per_token": fpt, "model_tflops_per_s": tps * fpt / 1e12,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": flops_lib.mfu(tps, fpt, n, peak),
        "xla_flops_per_token": (xla_flops / tokens_per_step) if xla_flops else None,
        "memory": memory, "warmup_s": warm_s, "loss_after_warmup": loss,
        "jax": jax.__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def write(prefix: str, row: dict) -> None:
    """Merges `row` into PREFIX.json (same config/devices/batch/seq_len replaced) and rewrites PREFIX.md."""
    path = prefix + ".json"
    data = {"rows": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    key = lambda r: (r["config"], r.get("overrides", ""), r["devices"],  # noqa: E731
                     r["per_device_batch"], r["seq_len"], json.dumps(r["mesh"], sort_keys=True))
    data["rows"] = [r for r in data["rows"] if key(r) != key(row)] + [row]
    data["rows"].sort(key=lambda r: (r["config"], r["seq_len"], r["devices"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    base = {}
    for r in data["rows"]:
        if r["devices"] == 1:
            base[(r["config"], r.get("overrides", ""), r["per_device_batch"], r["seq_len"])] = \
                r["tokens_per_s"]
    lines = ["| config | device | devices | mesh | batch/dev x seq | params | step ms | tokens/s | "
             "scaling vs 1 | MFU | XLA/model FLOPs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        one = base.get((r["config"], r.get("overrides", ""), r["per_device_batch"], r["seq_len"]))
        scale = f"{r['tokens_per_s'] / one:.2f}x" if one else "—"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        ratio = (f"{r['xla_flops_per_token'] / r['train_flops_per_token']:.2f}"
                 if r.get("xla_flops_per_token") else "—")
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        name = r["config"] + (f" {r['overrides']}" if r.get("overrides") else "")
        lines.append(f"| {name} | {r['device']} | {r['devices']} | {mesh} | "
                     f"{r['per_device_batch']}x{r['seq_len']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {scale} | {mfu} | {ratio} |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in data["rows"]]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args, pairs = parse_args(sys.argv[1:] if argv is None else argv)
    row = measure(args, pairs)
    print(json.dumps(row, indent=1))
    if args.out:
        write(args.out, row)
    return row


if __name__ == "__main__":
    main()
