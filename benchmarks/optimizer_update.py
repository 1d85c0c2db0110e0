"""The optimizer update alone, leaf by leaf (optax) against flat (train.flat_update), jitted.

    python -m benchmarks.optimizer_update --config configs/base.py \
        --out benchmarks/results/optimizer_update_h200

What is timed: `optim.apply_update` — global-norm clip + AdamW + EMA + the step's gradient and
parameter norms — on the parameters of `--config` (random values of the config's shapes in
train.param_dtype, one device), with fixed random gradients. The parameters, optimizer state
and EMA are donated and fed back, as in the train step. Each path is compiled (timed apart),
run `--warmup` times, then timed in `--repeats` windows of `--steps` calls dispatched back to
back, the clock stopping when the last call's outputs are ready; the median window / steps is
reported. The "tree" path is `make_optimizer` with train.flat_update False (the optax chain),
"flat" the same with it True (`optim.FlatAdamW`). train.warmup_steps is set to 0, so the
first update already moves the parameters (the learning rate does not change the work).

Each row: ms per update, compile seconds, the number of operations in the compiled program's
entry computation (kernels, roughly, on a GPU), the parameter count and leaf count, and for
the flat row the largest difference of one update's new parameters from the tree path's.
Written as PREFIX.json + PREFIX.md with the exact command and the device.
Config overrides: `--config.KEY=VALUE` as in dimba_jax.main (e.g. --config.model.n_layers=2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from dimba_jax.train import optim
from dimba_jax.train import overrides as ov
from dimba_jax.train import state as state_lib
from dimba_jax.train.tasks import make_task

PATHS = ("tree", "flat")


def parse_args(argv):
    rest, pairs = ov.split_config_args(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/base.py")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {PATHS}")
    p.add_argument("--steps", type=int, default=10, help="calls per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    p.add_argument("--out", default="", help="output prefix: PREFIX.json + PREFIX.md")
    args = p.parse_args(rest)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        raise ValueError("--steps and --repeats must be >= 1, --warmup >= 0")
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not args.paths or set(args.paths) - set(PATHS):
        raise ValueError(f"--paths {args.paths}: choose from {PATHS}")
    return args, pairs


def entry_ops(hlo_text: str) -> int:
    """Operations of the ENTRY computation of an optimized HLO module text, without parameters,
    constants, tuples, get-tuple-elements and bitcasts (roughly the kernels launched)."""
    body = hlo_text[hlo_text.index("\nENTRY"):].split("\n}", 1)[0].splitlines()[1:]
    skip = re.compile(r"= \S+ (parameter|constant|tuple|get-tuple-element|bitcast)\(")
    return sum(1 for line in body if " = " in line and not skip.search(line))


def make_inputs(config):
    """(params, grads, ema or None, parts) on the first device: random params of the config's
    shapes in train.param_dtype (normal, std 0.02) and gradients (normal, std 1e-3)."""
    task = make_task(config)
    parts = state_lib.model_parts(task, jax.random.PRNGKey(0))
    abstract = state_lib.cast_floats(parts.abstract_params, jnp.dtype(config.train.param_dtype))
    leaves, treedef = jax.tree.flatten(abstract)

    @jax.jit
    def draw(key):
        keys = jax.random.split(key, 2 * len(leaves))
        p = [(0.02 * jax.random.normal(k, s.shape)).astype(s.dtype) for k, s in zip(keys, leaves)]
        g = [(1e-3 * jax.random.normal(k, s.shape)).astype(s.dtype)
             for k, s in zip(keys[len(leaves):], leaves)]
        return jax.tree.unflatten(treedef, p), jax.tree.unflatten(treedef, g)

    params, grads = draw(jax.random.PRNGKey(0))
    ema = jax.tree.map(jnp.copy, params) if float(config.train.ema_decay) > 0 else None
    return params, grads, ema, parts


def time_path(config, path: str, params, grads, ema, parts, args) -> tuple[dict, object]:
    """Times one path; returns (row, the new params of one update from the given inputs)."""
    config.train.flat_update = path == "flat"
    tx = optim.make_optimizer(config.train, parts.abstract_params, parts.logical_axes)
    ema_decay = float(config.train.ema_decay)

    def update(params, opt_state, ema, step, grads):
        params, opt_state, ema, gn, pn = optim.apply_update(tx, grads, opt_state, params, ema,
                                                            step + 1, ema_decay)
        return params, opt_state, ema, step + 1, gn, pn

    fn = jax.jit(update, donate_argnums=(0, 1, 2))
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    opt_state = jax.jit(tx.init)(params)
    step = jnp.int32(0)
    one = jax.jit(update)(params, opt_state, ema, step, grads)[0]  # not donated: a reference
    t0 = time.perf_counter()
    compiled = fn.lower(params, opt_state, ema, step, grads).compile()
    compile_s = time.perf_counter() - t0
    carry = (copy(params), opt_state, copy(ema), step)

    def run():
        nonlocal carry
        p, s, e, st, gn, pn = compiled(*carry, grads)
        carry = (p, s, e, st)
        return gn, pn, p

    for _ in range(args.warmup):
        jax.block_until_ready(run())
    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(args.steps):
            out = run()
        jax.block_until_ready(out)
        windows.append((time.perf_counter() - t0) / args.steps * 1e3)
    row = {"path": path, "ms": statistics.median(windows), "windows_ms": windows,
           "compile_s": compile_s, "entry_ops": entry_ops(compiled.as_text()),
           "params": int(sum(x.size for x in jax.tree.leaves(params))),
           "leaves": len(jax.tree.leaves(params)), "param_dtype": str(config.train.param_dtype),
           "ema": ema is not None}
    return row, one


def to_markdown(report: dict) -> str:
    """The rows as a Markdown table, with the setup and the command."""
    s = report["setup"]
    lines = [f"# Optimizer update alone: {s['config']}"
             + (f" ({s['overrides']})" if s["overrides"] else ""), "",
             f"Device: {s['device']} (jax {s['jax']}). {s['params'] / 1e6:.1f}M parameters in "
             f"{s['leaves']} leaves, {s['param_dtype']}, EMA {'on' if s['ema'] else 'off'}.", "",
             "| path | ms / update | entry ops | compile s | max param diff vs tree |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        diff = r.get("max_param_diff_vs_tree")
        lines.append(f"| {r['path']} | {r['ms']:.3f} | {r['entry_ops']} | {r['compile_s']:.1f} | "
                     f"{'—' if diff is None else f'{diff:.3g}'} |")
    lines += ["", "Command:", "", f"    {report['command']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """Times the paths; returns the report {"setup", "rows", "command"}."""
    argv = sys.argv[1:] if argv is None else argv
    args, pairs = parse_args(argv)
    config = ov.apply_overrides(ov.load_config_file(args.config), pairs)
    config.train.warmup_steps = 0
    params, grads, ema, parts = make_inputs(config)
    rows, first = [], {}
    for path in args.paths:
        print(f"[path {path}]", flush=True)
        row, first[path] = time_path(config, path, params, grads, ema, parts, args)
        if path == "flat" and "tree" in first:
            diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(
                a.astype(jnp.float32) - b.astype(jnp.float32)))), first["flat"], first["tree"])
            row["max_param_diff_vs_tree"] = max(jax.tree.leaves(diffs))
        rows.append(row)
        print(json.dumps(row), flush=True)
    r0 = rows[0]
    report = {
        "setup": {"config": args.config, "overrides": " ".join(f"{k}={v}" for k, v in pairs),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "params": r0["params"], "leaves": r0["leaves"],
                  "param_dtype": r0["param_dtype"], "ema": r0["ema"]},
        "rows": rows,
        "command": " ".join(["python -m benchmarks.optimizer_update"] + [shlex.quote(a) for a in argv]),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
