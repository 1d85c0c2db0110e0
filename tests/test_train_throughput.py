"""benchmarks/train_throughput.py: `measure` compiles each variant of the train step once."""

import argparse
import collections
import gzip

import jax

from benchmarks import train_throughput


def test_measure_compiles_each_step_variant_once_and_no_more(tmp_path):
    """With the host's self-conditioning coin the step has two compiled variants: `measure`
    lowers both, compiles them concurrently, and the warm-up and timed steps reuse those
    programs (two backend compiles of the step in all, not one per variant more); with
    hlo_dir it writes both programs' optimized HLO, gzipped."""
    compiles = collections.Counter()
    listening = [True]

    def listener(event, duration, **kw):
        if listening[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles[kw.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    args = argparse.Namespace(config="configs/tiny.py", per_device_batch=2, seq_len=32, devices=1,
                              steps=2, repeats=2, warmup=2, hlo_dir=str(tmp_path / "hlo"))
    try:
        row = train_throughput.measure(args, [("diffusion.self_cond_coin", "host")])
    finally:
        listening[0] = False
    assert compiles["jit(step)"] == 2, compiles
    assert row["compile_s"] > 0 and row["step_ms"] > 0
    texts = [gzip.open(tmp_path / "hlo" / f"base_{k}.hlo.txt.gz", "rt").read() for k in (0, 1)]
    assert all(t.startswith("HloModule") and "ENTRY" in t for t in texts)
    assert texts[0] != texts[1]  # the step without and with the self-conditioning pass
