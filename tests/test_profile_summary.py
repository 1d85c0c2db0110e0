"""benchmarks/profile_summary.py (trace -> per-kernel summary) and the variant / mesh / profile
modes of benchmarks/train_throughput.py, on CPU.

The parser is checked on a real trace jax writes on CPU (XLA-op events on host threads), against
the compiled HLO of the same program, and on a hand-built trace shaped like a GPU one (device
process with stream lines and derived lines) whose totals are counted by hand.
"""

import gzip
import importlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_summary as ps
from benchmarks import train_throughput as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_ssd_module(tmp_path):
    """A module living in a folder named `ssd` (as dimba_jax/ssd/ does): its ops must be
    attributed to the "ssd" category through the HLO stack frames."""
    pkg = tmp_path / "fakepkg" / "ssd"
    pkg.mkdir(parents=True)
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "scan.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp

        def decay_scan(x):
            return jnp.cumsum(jnp.exp(-jnp.abs(x)) * 0.5, axis=-1)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module("fakepkg.ssd.scan")
    finally:
        sys.path.remove(str(tmp_path))


def test_cpu_trace_summary(tmp_path):
    scan = _fake_ssd_module(tmp_path)

    def loss(w, x):
        h = jnp.tanh(x @ w)
        return jnp.sum(scan.decay_scan(h) ** 2) + jnp.sum(h.T * 2.0)

    step = jax.jit(jax.grad(loss))
    w = jnp.ones((128, 128)) * 0.01
    x = jnp.ones((64, 128))
    compiled = step.lower(w, x).compile()
    hlo = compiled.as_text()
    jax.block_until_ready(step(w, x))
    steps = 2
    with jax.profiler.trace(str(tmp_path / "trace")):
        for _ in range(steps):
            jax.block_until_ready(step(w, x))

    events, info = ps.select_device_events(ps.load_events(ps.find_trace_file(str(tmp_path / "trace"))))
    assert info["source"] == "host_xla_ops" and events
    sources = ps.parse_hlo_sources(hlo)
    # Every selected event names an instruction of the compiled program.
    assert all(e["args"]["hlo_op"] in sources for e in events)

    s = ps.summarize(events, info, steps, None, sources)
    cats = {c["category"]: c for c in s["categories"]}
    assert "gemm" in cats and "ssd" in cats, cats
    # The categories partition the kernel time; busy <= sum; the idle gap closes the step.
    assert sum(c["ms_per_step"] for c in s["categories"]) == pytest.approx(s["kernel_ms_per_step"])
    assert s["busy_ms_per_step"] <= s["kernel_ms_per_step"] + 1e-9
    assert s["idle_ms_per_step"] == pytest.approx(s["step_wall_ms"] - s["busy_ms_per_step"])
    assert 0 <= s["idle_ms_per_step"] < s["step_wall_ms"]
    # The dot is a gemm (opcode), never attributed to the ssd folder; the cumsum is.
    for k in s["top_kernels"]:
        attr = ps.hlo_attribution(k["hlo_ops"][0], sources)
        if "dot" in attr["opcodes"] and not attr["ssd"]:
            assert k["category"] == "gemm"
        if attr["ssd"]:
            assert k["category"] == "ssd"
            assert any("/ssd/" in f for f, _ in sources[k["hlo_ops"][0]]["frames"]) or any(
                "/ssd/" in f for c in sources[k["hlo_ops"][0]]["fused"]
                for f, _ in sources[c]["frames"])
    # grad => backward ops exist (op_name under transpose(...)).
    assert s["direction"].get("backward", {}).get("ms_per_step", 0) > 0
    # The kernels outside the project, by op_name: every such kernel counted once, and this
    # test's own code (outside dimba_jax) names its ops, the transposes included.
    outside = next(f["ms_per_step"] for f in s["by_function"]
                   if f["function"] == "(outside dimba_jax)")
    assert sum(o["ms_per_step"] for o in s["outside_by_op"]) == pytest.approx(outside)
    assert any("transpose(" in o["op"] for o in s["outside_by_op"]), s["outside_by_op"]
    assert all(o["op"].count("/") <= 2 for o in s["outside_by_op"])
    # ... and their innermost frame: this file, by its last two path parts.
    assert any(o["frame"].startswith("tests/test_profile_summary.py:") for o in s["outside_by_op"])
    # The CPU trace records every thunk: the completeness check must call it complete, and the
    # dot must be among the instructions it expects and finds.
    c = ps.completeness(events, steps, hlo)
    assert c["complete"], c
    assert c["by_kind"]["gemm"]["seen"] == c["by_kind"]["gemm"]["instructions"] >= 1

    prefix = str(tmp_path / "out" / "prof")
    ps.write_summary(s, prefix)
    md = open(prefix + ".md").read()
    assert "idle gap" in md and "| ssd |" in md and "innermost source frame and the last" in md
    assert json.load(open(prefix + ".json"))["steps"] == steps


def _gpu_like_trace(path):
    """A trace shaped like jax's on a GPU: device processes with stream and derived lines."""
    M = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,  # noqa: E731
                                      "args": {"name": name}}
    X = lambda pid, tid, ts, dur, name, op="": {"ph": "X", "pid": pid, "tid": tid, "ts": ts,  # noqa: E731
                                                "dur": dur, "name": name,
                                                "args": {"hlo_op": op, "hlo_module": "jit_step"}}
    ev = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:1"}},
        {"ph": "M", "pid": 701, "name": "process_name", "args": {"name": "/host:CPU"}},
        M(1, 13, "thread_name", "Stream #13(Compute)"),
        M(1, 14, "thread_name", "Stream #14(NCCL)"),
        M(1, 200, "thread_name", "XLA Ops"),
        M(2, 13, "thread_name", "Stream #13(Compute)"),
        M(701, 5, "thread_name", "python"),
    ]
    for step in range(2):  # two steps of 1000 us
        t = 1000.0 * step
        ev += [
            X(1, 13, t + 0, 300, "nvjet_tst_192x128_64x4_2x1_v_bz_TNT", "cublas-gemm.1"),
            X(1, 13, t + 300, 200, "ssd_chunk_fwd", "custom-call.4"),
            X(1, 13, t + 500, 100, "loop_add_fusion_3", "loop_add_fusion.3"),
            X(1, 13, t + 600, 50, "input_reduce_fusion", "input_reduce_fusion"),
            X(1, 13, t + 650, 50, "MemcpyD2D", "copy.2"),
            X(1, 14, t + 550, 200, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce-start.1"),
            X(1, 200, t + 0, 300, "cublas-gemm.1", "cublas-gemm.1"),  # derived line: skipped
            X(2, 13, t + 0, 900, "nvjet_other_device", "cublas-gemm.1"),  # GPU 1: skipped
            X(701, 5, t + 0, 40, "PjitFunction(step)"),  # host: skipped
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": ev}, f)


def test_gpu_like_trace_selection_and_totals(tmp_path):
    _gpu_like_trace(tmp_path / "plugins" / "profile" / "run1" / "host.trace.json.gz")
    s = ps.summarize_dir(str(tmp_path), steps=2, step_ms=1.0)
    assert s["source"] == "device" and s["process"] == "/device:GPU:0"
    assert s["devices_in_trace"] == 2 and s["kernels_per_step"] == 6
    # Hand count per step: 300+200+100+50+50 on the compute stream, 200 on NCCL (overlapping
    # 550..750 with 500..700 of the compute stream): sum 900 us, union 0..750 = 750 us.
    assert s["kernel_ms_per_step"] == pytest.approx(0.9)
    assert s["busy_ms_per_step"] == pytest.approx(0.75)
    assert s["idle_ms_per_step"] == pytest.approx(0.25) and s["idle_pct"] == pytest.approx(25.0)
    cats = {c["category"]: c["ms_per_step"] for c in s["categories"]}
    assert cats == pytest.approx({"gemm": 0.3, "ssd": 0.2, "elementwise/fusion": 0.1,
                                  "reduction": 0.05, "copy/transpose": 0.05, "collective": 0.2})
    assert s["top_kernels"][0]["name"].startswith("nvjet") and s["top_kernels"][0]["pct_of_step"] \
        == pytest.approx(30.0)
    with pytest.raises(FileNotFoundError, match="no"):
        ps.find_trace_file(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="steps"):
        ps.summarize([{"ts": 0, "dur": 1}], {}, 0)


def test_variant_and_mesh_parsing():
    assert tt.parse_variant("b32:per_device_batch=32,model.ssd_impl=pallas") == \
        ("b32", [("per_device_batch", "32"), ("model.ssd_impl", "pallas")])
    assert tt.parse_variant("baseline:") == ("baseline", [])
    assert tt.parse_mesh("data=2,fsdp=2") == [("mesh.data", "2"), ("mesh.fsdp", "2"),
                                             ("mesh.tensor", "1")]
    for bad in (":x=1", "v:novalue", "a b:x=1"):
        with pytest.raises(ValueError):
            tt.parse_variant(bad)
    with pytest.raises(ValueError, match="AXIS"):
        tt.parse_mesh("pipeline=2")


def test_train_throughput_four_devices_variants_profile(tmp_path):
    """4 fake CPU devices, data=2 x fsdp=2: a failing variant is recorded, the next one is
    measured and profiled, the budget stops the third."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    out = str(tmp_path / "tt")
    cmd = [sys.executable, "-m", "benchmarks.train_throughput",
           "--config", os.path.join(ROOT, "configs", "tiny.py"), "--per-device-batch", "1",
           "--seq-len", "16", "--devices", "4", "--mesh", "data=2,fsdp=2", "--steps", "1",
           "--repeats", "1", "--warmup", "1", "--budget-s", "1",
           "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.chunk_size=8",
           "--config.model.self_condition=false", "--config.train.ema_decay=0",
           "--config.model.time_embed_dim=16",
           "--variant", "bad:model.no_such_key=1", "--variant", "base:",
           "--variant", "never:per_device_batch=2",
           "--profile-dir", str(tmp_path / "prof"), "--profile-variants", "base", "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.load(open(out + ".json"))
    (row,) = data["rows"]
    assert row["variant"] == "base" and row["devices"] == 4
    assert row["command"].startswith("python -m benchmarks.train_throughput --config ")
    assert data["failed"][0]["command"] == row["command"]
    assert row["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and row["global_batch"] == 4
    assert row["tokens_per_s"] > 0 and row["profile"]["busy_ms_per_step"] > 0
    assert [f["variant"] for f in data["failed"]] == ["bad"]
    assert "no_such_key" in data["failed"][0]["error"]
    assert "not starting never" in proc.stdout
    prof = json.load(open(out + "_profile.json"))["profiles"]
    assert len(prof) == 1 and prof[0]["variant"] == "base" and prof[0]["categories"]
    md = open(out + ".md").read()
    assert "data2xfsdp2" in md and "Failed:" in md


HAND_HLO = """HloModule hand

%fused_add (p0: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  ROOT %a = f32[4]{0} add(%p0, %p0)
}

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  %x = f32[4,4]{1,0} get-tuple-element(%t), index=1
  %gemm = (f32[4,4]{1,0}, s8[0]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %g0 = f32[4,4]{1,0} get-tuple-element(%gemm), index=0
  %i = s32[] get-tuple-element(%t), index=0
  %inc = s32[] fusion(%i), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[4,4]{1,0}) tuple(%inc, %g0)
}

%cond (t: (s32[], f32[4,4])) -> pred[] {
  %t = (s32[], f32[4,4]{1,0}) parameter(0)
  ROOT %lt = pred[] fusion(%t), kind=kLoop, calls=%fused_add
}

%branch_a (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %fa = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add
}

%command_buffer (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %cbf = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add
}

%branch_b (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %fb1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %fb2 = f32[4]{0} fusion(%fb1), kind=kLoop, calls=%fused_add
}

ENTRY %main (a: f32[4,4], v: f32[4], p: s32[]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %v = f32[4]{0} parameter(1)
  %p = s32[] parameter(2)
  %tg = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %c0 = s32[] constant(0)
  %t0 = (s32[], f32[4,4]{1,0}) tuple(%c0, %tg)
  %w = (s32[], f32[4,4]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %cnd = f32[4]{0} conditional(%p, %v, %v), branch_computations={%branch_a, %branch_b}
  %cp = f32[4,4]{1,0} copy(%tg)
  %command_buffer.1 = f32[4]{0} call(%v), to_apply=%command_buffer
  ROOT %out = f32[4,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_expected_kernels_counted_by_hand():
    e = ps.expected_kernels(HAND_HLO)
    # ENTRY: triton gemm fusion 1 + copy 1 + the fusion in the called command buffer 1;
    # while x4: cublas gemm 4 + fusion 4, condition 5; conditional: branch_a 1 or branch_b 2.
    assert (e["launches_min"], e["launches_max"]) == (17.0, 18.0)
    assert e["by_kind"] == {"gemm": 5.0, "fusion": 13.0, "copy": 1.0}
    ins = e["instructions"]
    assert ins["gemm"] == {"kind": "gemm", "launches": 4.0, "optional": False, "via": ""}
    assert ins["cbf"]["via"] == "command_buffer.1"
    assert ins["lt"]["launches"] == 5.0 and ins["tg"]["kind"] == "gemm"
    assert ins["fb2"]["optional"] and not ins["cp"]["optional"]
    assert e["conditionals"] == 1 and e["unknown_trip_counts"] == 0
    with pytest.raises(ValueError, match="ENTRY"):
        ps.expected_kernels("HloModule empty\n")


def test_incomplete_trace_is_flagged(tmp_path):
    """A trace that lost every GEMM (as the H200 profiles did) is called INCOMPLETE."""
    def ev(name, op, ts):
        return {"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": 1.0, "name": name,
                "args": {"hlo_op": op}}
    ops = ["lt"] * 5 + ["inc"] * 4 + ["cp", "fa", "command_buffer_1"]  # no "tg", no "gemm"
    events = [ev(f"k_{op}", op, 10.0 * i) for i, op in enumerate(ops)]
    events.append(ev("Memset 3", "gemm", 200.0))  # a memset of the gemm is not its kernel
    c = ps.completeness(events, 1, HAND_HLO)
    assert not c["complete"]
    assert c["captured_kernels_per_step"] == 12 and c["expected_launches_per_step"] == [17, 18]
    # cbf ran inside the command buffer whose name its event carries: not checkable by name.
    assert c["instructions_in_command_buffers"] == 1
    # Event ratio: on CPU a call is one event (its event and its launch are left out: 11/16);
    # on GPU every kernel of the command buffer is an event (all count: 12/17).
    assert c["captured_over_expected"] == pytest.approx(11 / 16)
    gpu = ps.completeness(events, 1, HAND_HLO, calls_report_kernels=True)
    assert gpu["captured_over_expected"] == pytest.approx(12 / 17) and not gpu["complete"]
    assert c["by_kind"]["gemm"] == {"instructions": 2, "seen": 0, "expected_launches_per_step": 5.0}
    assert c["instructions_expected"] == 5 and c["instructions_seen"] == 3
    assert set(c["missing_examples"]) == {"gemm", "tg"}
    trace = tmp_path / "plugins" / "profile" / "run" / "h.trace.json.gz"
    trace.parent.mkdir(parents=True)
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name",
             "args": {"name": "Stream #7(Compute)"}}]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    (tmp_path / ps.HLO_FILE).write_text(HAND_HLO)  # picked up without --hlo
    s = ps.summarize_dir(str(tmp_path), steps=1)
    assert s["completeness"]["complete"] is False and s["trace_events_total"] == len(events) + 2
    md = ps.to_markdown(s)
    assert md.index("INCOMPLETE TRACE") < md.index("| category |")


def test_kernels_on_a_cupti_overhead_line_are_read():
    """XLA renames a stream's line "CUPTI overhead" when an overhead record lands on it; its
    kernels must still count, its overhead records must not."""
    def ev(tid, ts, dur, name, op=""):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_op": op} if op else {}}
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 14, "name": "thread_name",
             "args": {"name": "Stream #14(Compute)"}},
            {"ph": "M", "pid": 1, "tid": 15, "name": "thread_name",
             "args": {"name": "CUPTI overhead"}},
            {"ph": "M", "pid": 1, "tid": 99, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    events = [ev(14, 0, 10, "loop_fusion", "fusion.1"),
              ev(15, 10, 30, "nvjet_sm90_tst_128x128", "cublas-lt-matmul.1"),
              ev(15, 40, 5, "INSTRUMENTATION"),
              ev(99, 0, 40, "fusion.1", "fusion.1")]
    chosen, info = ps.select_device_events(meta + events)
    assert sorted(e["name"] for e in chosen) == ["loop_fusion", "nvjet_sm90_tst_128x128"]
    assert info["line_events"] == {"CUPTI overhead": 2, "Stream #14(Compute)": 1, "XLA Ops": 1}
    s = ps.summarize(chosen, info, 1)
    assert {c["category"]: c["ms_per_step"] for c in s["categories"]} == \
        pytest.approx({"gemm": 0.03, "elementwise/fusion": 0.01})
    assert "CUPTI overhead (2)" in ps.to_markdown(s)


def test_overlapping_stream_kernels_are_all_kept():
    """Hopper launches a kernel before its predecessor ends (programmatic dependent launch):
    overlapping kernels of one stream are not parent and child; only full containment (a CPU
    `while` thunk around its body's ops) drops the enclosing event."""
    def ev(tid, ts, dur, name, op):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_op": op}}
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 14, "name": "thread_name",
             "args": {"name": "Stream #14(Compute)"}}]
    gemm = ev(14, 0, 100, "nvjet_sm90_tst_256x128_64x4", "cublas-lt-matmul.3")
    fusion = ev(14, 95, 55, "loop_add_fusion_7", "loop_add_fusion.7")  # starts before gemm ends
    chosen, _ = ps.select_device_events(meta + [gemm, fusion])
    assert len(chosen) == 2
    s = ps.summarize(chosen, {"source": "device"}, 1)
    assert s["kernel_ms_per_step"] == pytest.approx(0.155)
    assert s["busy_ms_per_step"] == pytest.approx(0.150)  # union 0..150 us
    # leaf_events itself: containment drops the parent, overlap drops nothing.
    parent = ev(5, 0, 100, "while.1", "while.1")
    kids = [ev(5, 10, 20, "fusion.1", "fusion.1"), ev(5, 40, 30, "dot.2", "dot.2")]
    assert sorted(e["name"] for e in ps.leaf_events([parent] + kids)) == ["dot.2", "fusion.1"]
    assert len(ps.leaf_events([ev(5, 0, 100, "a", "a"), ev(5, 95, 55, "b", "b")])) == 2


def test_command_buffers_below_the_hlo_are_checked_by_count():
    """jax 0.11 on the H200: every kernel event carries "command_buffer_N", a CUDA graph made
    below the HLO text (no instruction or call of that name). Then no instruction matches by
    name, and the event count against the launches decides: complete when it matches."""
    def ev(op, ts):
        return {"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": 1.0, "name": f"k{ts}",
                "args": {"hlo_op": op}}
    all_17 = [ev("command_buffer_7", 10.0 * i) for i in range(17)]
    c = ps.completeness(all_17, 1, HAND_HLO, calls_report_kernels=True)
    assert c["complete"] and c["instruction_coverage"] is None
    assert c["unnamed_command_buffers"] == ["command_buffer_7"]
    assert c["captured_over_expected"] == pytest.approx(1.0)
    assert c["instructions_in_command_buffers"] == 6  # none matched by name (cbf included)
    assert "a command buffer the HLO text does not show" in "\n".join(
        ps._completeness_lines(c, None))
    # Half the kernels lost: still flagged.
    half = ps.completeness(all_17[:8], 1, HAND_HLO, calls_report_kernels=True)
    assert not half["complete"]
    # On the CPU path (calls are single events) nothing changes: coverage is still by name.
    cpu = ps.completeness(all_17, 1, HAND_HLO)
    assert cpu["instruction_coverage"] == 0.0 and not cpu["complete"]
