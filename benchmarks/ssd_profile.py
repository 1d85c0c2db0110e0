"""Per-kernel device time of one SSD call (forward, or forward + backward) on a GPU.

    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 -m benchmarks.ssd_profile \
        --shapes 1.3b-L2k,130m-L32k --out runs/ssd_profile

For each shape of ssd_pallas_bench.SHAPES (bf16) it jits what `ssd(impl="pallas")` runs (the
dispatcher with the default `KernelConfig`), warms it up, traces `--iters` calls
with jax.profiler and writes OUT/<shape>_<fwd|fwdbwd>.{json,md}: every kernel's time per call
(benchmarks.profile_summary). Command buffers must be off (the XLA flag above): with them on, jax 0.11
reports the kernels inside a buffer as one `command_buffer_N` event.
"""

from __future__ import annotations

import argparse
import os

import jax

from benchmarks import profile_summary
from benchmarks import ssd_pallas_bench as bench


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1.3b-L2k,130m-L32k")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--modes", default="fwd,fwdbwd")
    a = ap.parse_args()
    shapes = {s[0]: s for s in bench.SHAPES}
    for name in a.shapes.split(","):
        if name not in shapes:
            raise ValueError(f"unknown shape {name!r}; known: {sorted(shapes)}")
        _, b, l, h = shapes[name]
        inputs, dy = bench.make_inputs(jax.random.key(0), b, l, h, jax.numpy.bfloat16)
        args = [inputs[k] for k in bench.ARGS]
        for mode in a.modes.split(","):
            if mode == "fwd":
                f, call_args = bench.fwd_fn(bench.dispatcher_ssd), args
            elif mode == "fwdbwd":
                f, call_args = bench.fwdbwd_fn(bench.dispatcher_ssd), [dy, *args]
            else:
                raise ValueError(f"unknown mode {mode!r} (fwd, fwdbwd)")
            for _ in range(3):
                jax.block_until_ready(f(*call_args))
            trace_dir = os.path.join(a.out, f"trace_{name}_{mode}")
            with jax.profiler.trace(trace_dir):
                for _ in range(a.iters):
                    out = f(*call_args)
                jax.block_until_ready(out)
            summary = profile_summary.summarize_dir(trace_dir, a.iters)
            prefix = os.path.join(a.out, f"{name}_{mode}")
            profile_summary.write_summary(summary, prefix, title=f"SSD {name} {mode} per call")
            print(open(prefix + ".md").read(), flush=True)


if __name__ == "__main__":
    main()
