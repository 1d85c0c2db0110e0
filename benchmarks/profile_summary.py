"""A small per-kernel summary of a jax.profiler trace: where a train step's device time goes.

    python -m benchmarks.profile_summary PROFILE_DIR --steps 3 --step-ms 190.7 \
        [--hlo compiled_hlo.txt] --out benchmarks/results/profile_h200

Reads the newest `plugins/profile/*/*.trace.json.gz` (Chrome trace JSON that jax writes beside
the .xplane.pb; `perfetto_trace.json.gz` is the same events without the metadata) under
PROFILE_DIR and selects the events that are device work:

- GPU/TPU traces: the processes named "/device:GPU:N" (or "/device:TPU:N"); within them the
  threads named "Stream #..." (CUDA streams: one event per kernel or memcpy; the kernel name is
  the event name and the HLO instruction is `args.hlo_op`). The derived lines the profiler adds
  ("XLA Ops", "XLA Modules", "Steps", ...) are skipped: they repeat the same time; a line XLA
  named "CUPTI overhead" (a stream that also got a CUPTI overhead record) is read without its
  overhead records. Kernels of one stream may overlap (programmatic dependent launch on
  Hopper): all are kept. Only the first device process is summarised (weak scaling runs the
  same program on each device).
- CPU traces (no device process): the host-thread events that carry `args.hlo_op` (XLA's thunk
  executor records one per HLO op); events fully enclosing others of the same thread (a
  `while` thunk around its body's ops) are dropped so that time is not counted twice.

Output (JSON + Markdown): kernel time per step (sum of durations and the union of busy
intervals, which differ when streams overlap), the top kernels (name, count per step, ms per
step, % of the step), a grouping into categories (gemm, ssd, elementwise/fusion, reduction,
collective, copy/transpose, other) and the idle gap = step wall time - busy time per step.

With `--hlo` (the text of `compiled.as_text()` of the same program) each kernel is also mapped to
its HLO instruction's source location (the stack frames XLA keeps in op metadata): kernels whose
ops come from `dimba_jax/ssd/` are counted as SSD even when they are plain XLA fusions, and time
is split into forward / backward (op_name under `transpose(`) and by innermost project function;
the kernels no project frame names are grouped by their innermost source frame (optax's updates,
a library's helper) and the last three parts of their JAX op_name (autodiff's transposes, XLA's
own splits).

Completeness check (GPU profiles have come back with most kernels missing): with the HLO text
(`--hlo`, or PROFILE_DIR/program.hlo.txt that benchmarks/train_throughput.py saves) the kernel
launches one step needs are counted from the compiled program (fusions, custom calls, copies,
...; `while` bodies times their known trip count; a `conditional` as a min-max range) and
compared with the captured kernel events, and every kernel-launching HLO instruction is checked
for at least one captured event (by kind: gemm, fusion, copy, collective, other). Below 80% the
summary says INCOMPLETE at the top of its Markdown; its per-kernel numbers are then not to be
trusted. The number of events in the trace JSON is recorded too: the JSON holds at most
TF_PROFILER_TRACE_VIEWER_MAX_EVENTS events (default 1,000,000; later ones are cut).

Standard library only (gzip + json + re).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
from collections import defaultdict

CATEGORIES = ("gemm", "ssd", "elementwise/fusion", "reduction", "collective", "copy/transpose",
              "other")
# Names XLA gives CUPTI overhead records (cupti_buffer_events.cc, getActivityOverheadKindString).
_CUPTI_OVERHEAD = re.compile(r"^(COMPILER|BUFFER_FLUSH|INSTRUMENTATION|RESOURCE|<UNKNOWN>)$")
_DERIVED_LINES = ("xla ops", "xla modules", "steps", "framework", "tensorflow", "source code",
                  "launch stats", "xla traceme", "host offload", "sparsecore")

_COLLECTIVE = re.compile(r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|allgather|"
                         r"reduce-scatter|reduce_scatter|reducescatter|collective-permute|"
                         r"collective_permute|all-to-all|all_to_all|alltoall|send|recv", re.I)
_GEMM = re.compile(r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|(^|[^a-z])dot([^a-z]|$)|"
                   r"dot_general|onednn|eigen.*contraction", re.I)
_SSD = re.compile(r"ssd", re.I)
VIEWER_DEFAULT_MAX_EVENTS = 1_000_000  # TF_PROFILER_TRACE_VIEWER_MAX_EVENTS default
_COPY = re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic_update_slice|"
                   r"concatenate|pad|slice|gather|scatter|bitcast", re.I)
_REDUCE = re.compile(r"reduce|reduction|argmax|argmin|softmax|norm", re.I)
_FUSION = re.compile(r"fusion|loop_|input_|elementwise|multiply|add|subtract|exp|tanh|convert|"
                     r"select|compare|divide|maximum|minimum|negate|log|sqrt|rsqrt|power|"
                     r"convolution|cudnn|conv", re.I)


# ----------------------------------------------------------------------------- trace reading

def find_trace_file(profile_dir: str) -> str:
    """The newest *.trace.json.gz (else perfetto_trace.json.gz) under PROFILE_DIR/plugins/profile.

    Raises:
      FileNotFoundError: no trace under `profile_dir`.
    """
    runs = sorted(glob.glob(os.path.join(profile_dir, "plugins", "profile", "*")),
                  key=os.path.getmtime)
    for run in reversed(runs):
        for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz"):
            found = sorted(glob.glob(os.path.join(run, pattern)))
            if found:
                return found[0]
    direct = glob.glob(os.path.join(profile_dir, "*.json.gz"))
    if direct:
        return sorted(direct)[0]
    raise FileNotFoundError(f"no *.trace.json.gz or perfetto_trace.json.gz under {profile_dir!r} "
                            "(expected PROFILE_DIR/plugins/profile/<run>/...)")


def load_events(path: str) -> list[dict]:
    """The trace events of a Chrome trace JSON file (.json or .json.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: no traceEvents list")
    return events


def leaf_events(events: list[dict]) -> list[dict]:
    """Drops events that fully enclose another event of the same thread (on CPU a `while` or
    `conditional` thunk spans the ops of its body, which are recorded too).

    Only full containment makes a parent: two events that merely overlap are both kept. (GPU
    kernels on one stream overlap when the next one is launched early, Hopper's programmatic
    dependent launch, used by cuBLAS's nvjet GEMMs; an earlier version of this function
    dropped the first of two overlapping events and so lost most GEMMs of the H200 traces.
    GPU stream lines are not passed through here at all, see select_device_events.)
    """
    by_thread = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs = sorted(evs, key=lambda e: (float(e["ts"]), -float(e["dur"])))
        parents = set()
        stack = []  # (end, index) of open events that enclose the current position
        for i, e in enumerate(evs):
            ts, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            while stack and stack[-1][0] <= ts:
                stack.pop()
            for open_end, j in reversed(stack):  # innermost first
                if end <= open_end:
                    parents.add(j)
                    break
            stack.append((end, i))
        out += [e for i, e in enumerate(evs) if i not in parents]
    return out


def select_device_events(events: list[dict]) -> tuple[list[dict], dict]:
    """Picks the device-work events (see the module docstring).

    Returns:
      (events, info): `events` are complete ("X") events with float ts/dur in microseconds;
      info = {"source": "device" | "host_xla_ops", "process": name, "devices": n, "lines": [...]}.
    Raises:
      ValueError: the trace holds neither device kernels nor XLA-op events.
    """
    process_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            process_names[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("name") == "thread_name":
            thread_names[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))

    def device_index(name):
        m = re.search(r"/device:(GPU|TPU)[^:]*:(\d+)", name)
        return int(m.group(2)) if m else None

    device_pids = sorted((device_index(n), pid) for pid, n in process_names.items()
                         if device_index(n) is not None)
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if device_pids:
        pid = device_pids[0][1]
        lines = {tid: n for (p, tid), n in thread_names.items() if p == pid}
        # XLA names a stream's line "CUPTI overhead" as soon as one CUPTI overhead record
        # lands on it (xla/backends/profiler/gpu/cupti_collector.cc, GetDeviceXLineName), so
        # such a line can hold kernels too: it is read, without its overhead records.
        streams = {tid for tid, n in lines.items()
                   if n.lower().startswith("stream") or "overhead" in n.lower()}
        if not streams:  # unknown line naming: everything that is not a derived line
            streams = {tid for tid, n in lines.items()
                       if not any(n.lower().startswith(d) for d in _DERIVED_LINES)}
        on_device = [e for e in complete if e.get("pid") == pid]
        line_events = defaultdict(int)
        for e in on_device:
            line_events[lines.get(e.get("tid"), str(e.get("tid")))] += 1
        # Kernels on a CUDA stream never nest: every event counts, overlapping or not (no
        # leaf_events here; it would take an early-launched kernel for a child).
        chosen = [e for e in on_device if e.get("tid") in streams
                  and not _CUPTI_OVERHEAD.match(str(e.get("name", "")))]
        if not any(lines.get(t, "").lower().startswith("stream") for t in streams):
            chosen = leaf_events(chosen)  # unknown (e.g. TPU) line naming: may nest
        if chosen:
            return chosen, {"source": "device", "process": process_names[pid],
                            "devices": len(device_pids),
                            "lines": sorted(lines[t] for t in streams),
                            "line_events": dict(sorted(line_events.items()))}
    chosen = leaf_events([e for e in complete
                          if isinstance(e.get("args"), dict) and "hlo_op" in e["args"]
                          and not str(e.get("name", "")).startswith("end: ")])
    if not chosen:
        raise ValueError("the trace has no device kernel events and no XLA-op events "
                         "(was anything executed between start_trace and stop_trace?)")
    threads = sorted({thread_names.get((e.get("pid"), e.get("tid")), str(e.get("tid")))
                      for e in chosen})
    return chosen, {"source": "host_xla_ops",
                    "process": process_names.get(chosen[0].get("pid"), ""), "devices": 0,
                    "lines": threads}


# ------------------------------------------------------------------------ HLO source mapping

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\b([a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_SOURCE_FILE = re.compile(r'source_file="([^"]*)"')


def parse_hlo_sources(hlo_text: str) -> dict[str, dict]:
    """Maps each HLO instruction name to where its ops come from.

    Args:
      hlo_text: `compiled.as_text()` (optimised HLO with its FileNames / FunctionNames /
        FileLocations / StackFrames tables, or older `source_file=` metadata).
    Returns:
      {instruction name: {"opcode": str, "op_name": str, "frames": [(file, function), ...]
       innermost first, "fused": [child instruction names] (fusions only)}}.
    """
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    instrs: dict[str, dict] = {}
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if section and s and s[0].isdigit():
            idx, _, rest = s.partition(" ")
            if section == "FileNames":
                files[int(idx)] = rest.strip().strip('"')
            elif section == "FunctionNames":
                funcs[int(idx)] = rest.strip().strip('"')
            elif section == "FileLocations":
                f = re.search(r"file_name_id=(\d+)", rest)
                g = re.search(r"function_name_id=(\d+)", rest)
                locs[int(idx)] = (int(f.group(1)) if f else 0, int(g.group(1)) if g else 0)
            elif section == "StackFrames":
                loc = re.search(r"file_location_id=(\d+)", rest)
                par = re.search(r"parent_frame_id=(\d+)", rest)
                frames[int(idx)] = (int(loc.group(1)) if loc else 0,
                                    int(par.group(1)) if par else 0)
            continue
        section = None
        if not s:
            continue
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(1)
            comps[current] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        op_name = _OPNAME.search(line)
        frame_id = _FRAME_ID.search(line)
        source = _SOURCE_FILE.search(line)
        calls = _CALLS.search(line)
        instrs[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                        "frame_id": int(frame_id.group(1)) if frame_id else 0,
                        "source_file": source.group(1) if source else "",
                        "calls": calls.group(1) if calls else ""}
        if current is not None:
            comps[current].append(name)

    def chain(frame_id):
        out, seen = [], set()
        while frame_id and frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            f, g = locs.get(loc, (0, 0))
            out.append((files.get(f, ""), funcs.get(g, "")))
            if parent == frame_id:
                break
            frame_id = parent
        return out

    result = {}
    for name, ins in instrs.items():
        fr = chain(ins["frame_id"])
        if not fr and ins["source_file"]:
            fr = [(ins["source_file"], "")]
        fused = [c for c in comps.get(ins["calls"], [])
                 if instrs.get(c, {}).get("opcode") not in ("parameter", "constant")]
        result[name] = {"opcode": ins["opcode"], "op_name": ins["op_name"], "frames": fr,
                        "fused": fused}
    return result


def _project_frame(frames, marker: str = "dimba_jax/") -> str:
    """The innermost frame inside the project as "pkg/file.py:function" ("" if none)."""
    for path, fn in frames:
        p = path.replace("\\", "/")
        if marker in p:
            return p[p.rindex(marker) + len(marker):] + (f":{fn}" if fn else "")
    return ""


def _outer_frame(frames) -> str:
    """The innermost frame as "dir/file.py:function" (the path's last two parts; for kernels no
    project frame names: optax's moment updates, jax's own helpers, a caller's script); ""
    when there are no frames."""
    if not frames:
        return ""
    path, fn = frames[0]
    tail = "/".join(path.replace("\\", "/").split("/")[-2:])
    return tail + (f":{fn}" if fn else "")


def _is_ssd_source(frames) -> bool:
    return any("/ssd/" in p.replace("\\", "/") for p, _ in frames)


def hlo_attribution(hlo_op: str, sources: dict[str, dict]) -> dict:
    """What the HLO instruction `hlo_op` (a trace event's args.hlo_op) computes.

    Returns {"ssd": bool (its root op or at least half of its fused ops come from a
    dimba_jax/ssd/ file), "backward": bool (op_name under transpose(...)), "function":
    innermost dimba_jax file:function or "", "opcodes": sorted HLO opcodes it runs (the fused
    ones for a fusion)}; False/""/() when the instruction is unknown.
    """
    ins = sources.get(hlo_op)
    if ins is None:
        return {"ssd": False, "backward": False, "function": "", "opcodes": (), "op": "",
                "frame": ""}
    children = [sources[c] for c in ins["fused"] if c in sources]
    opcodes = tuple(sorted({c["opcode"] for c in children} or {ins["opcode"]}))
    votes = [_is_ssd_source(c["frames"]) for c in children if c["frames"]]
    ssd = _is_ssd_source(ins["frames"]) or (bool(votes) and sum(votes) * 2 >= len(votes))
    op_names = [ins["op_name"]] + [c["op_name"] for c in children]
    backward = any("transpose(" in o for o in op_names if o)
    function = _project_frame(ins["frames"])
    if not function:
        for c in children:
            function = _project_frame(c["frames"])
            if function:
                break
    frame = _outer_frame(ins["frames"]) or next(
        (_outer_frame(c["frames"]) for c in children if c["frames"]), "")
    op_name = next((o for o in op_names if o), "")
    return {"ssd": ssd, "backward": backward, "function": function, "opcodes": opcodes,
            "op": op_path(op_name), "frame": frame}


def op_path(op_name: str, depth: int = 3) -> str:
    """The last `depth` components of a JAX op_name ("jit(step)/jit(main)/transpose(jvp(f))/
    mul" -> "jit(main)/transpose(jvp(f))/mul"), naming kernels that no dimba_jax frame names
    (autodiff's transposes, optax, XLA's own splits); "" for an empty op_name."""
    parts = [p for p in op_name.split("/") if p]
    return "/".join(parts[-depth:])


# ------------------------------------------------------------------------ completeness check

# Opcodes that launch nothing on the device (metadata, tuples, control flow containers).
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
             "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
             "get-dimension-size", "while", "conditional", "call", "async-start",
             "async-update", "async-done", "copy-done", "send-done", "recv-done",
             "all-reduce-done", "all-gather-done", "collective-permute-done", "iota"}
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"(?:true|false)_computation=%?([\w.\-]+)")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_TO_APPLY = re.compile(r"to_apply=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FUSION_KIND = re.compile(r'"kind"\s*:\s*"([^"]*)"')
# Events that are not the work of the HLO instruction they name: cuBLAS(Lt) zeroes its workspace
# with a memset under the matmul's annotation (the H200 traces kept those and lost the GEMMs).
_NOT_A_KERNEL = re.compile(r"^memset", re.I)


def _parse_hlo_structure(hlo_text: str) -> tuple[dict, str]:
    """{computation: [(instruction name, opcode, line)]} and the ENTRY computation's name."""
    comps: dict[str, list] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(1), m.group(2), line))
    return comps, entry


def _kernel_kind(opcode: str, line: str, comps: dict) -> str:
    """"gemm" | "fusion" | "collective" | "copy" | "other" for a kernel-launching instruction."""
    if opcode in ("dot", "convolution"):
        return "gemm"
    if opcode == "custom-call":
        target = _TARGET.search(line)
        t = target.group(1).lower() if target else ""
        return "gemm" if re.search(r"gemm|matmul|cublas|dot", t) else "other"
    if opcode == "fusion":
        kind = _FUSION_KIND.search(line)
        if kind and re.search(r"gemm|dot|cublas|matmul|ynn", kind.group(1), re.I):
            return "gemm"
        called = _CALLS.search(line)
        ops = {o for _, o, _ in comps.get(called.group(1), [])} if called else set()
        return "gemm" if ops & {"dot", "convolution"} else "fusion"
    if opcode in _COLLECTIVE_OPS or opcode.endswith("-start"):
        return "collective"
    if opcode in _DATA_MOVEMENT_OPS:
        return "copy"
    return "other"


def expected_kernels(hlo_text: str) -> dict:
    """Kernel launches one execution of the compiled program needs, from its optimised HLO.

    Walks from ENTRY: each instruction that is not free (_FREE_OPS) counts one launch, times
    the trip count of the `while` loops around it (backend_config known_trip_count; 1 and
    counted in "unknown_trip_counts" when absent) — the condition runs trip+1 times; `call` /
    `async-start` bodies are walked; of a `conditional` the cheapest and the dearest branch
    give the range [launches_min, launches_max] (which branch runs depends on the data).
    Fused computations and reducers (to_apply of reduce / all-reduce / sort) are not walked.
    Returns {"launches_min", "launches_max" (per execution), "by_kind": {kind: launches_max},
    "instructions": {name: {"kind", "launches" (max), "optional" (inside a conditional
    branch: may legitimately not run), "via" (the outermost `call` around it, e.g. an XLA
    command buffer, or "")}}, "unknown_trip_counts",
    "conditionals"}.
    Raises ValueError when the text has no ENTRY computation.
    """
    comps, entry = _parse_hlo_structure(hlo_text)
    if not entry:
        raise ValueError("expected_kernels: no ENTRY computation in the HLO text")
    instructions: dict[str, dict] = {}
    stats = {"unknown_trip_counts": 0, "conditionals": 0}

    def walk(comp: str, mult: float, depth: int = 0, optional: bool = False,
             via: str = "") -> tuple[float, float]:
        lo = hi = 0.0
        if depth > 64 or comp not in comps:
            return lo, hi
        for name, opcode, line in comps[comp]:
            if opcode == "while":
                trip = _TRIP_COUNT.search(line)
                n = int(trip.group(1)) if trip else 1
                if not trip:
                    stats["unknown_trip_counts"] += 1
                body, cond = _BODY.search(line), _CONDITION.search(line)
                for sub, times in ((body, n), (cond, n + 1)):
                    if sub:
                        a, b = walk(sub.group(1), mult * times, depth + 1, optional, via)
                        lo, hi = lo + a, hi + b
            elif opcode == "conditional":
                stats["conditionals"] += 1
                m = _BRANCHES.search(line)
                names = ([b.strip().lstrip("%") for b in m.group(1).split(",")] if m
                         else _TRUE_FALSE.findall(line))
                ranges = [walk(b, mult, depth + 1, True, via) for b in names if b]
                if ranges:
                    lo += min(r[0] for r in ranges)
                    hi += max(r[1] for r in ranges)
            elif opcode == "call":
                sub = _TO_APPLY.search(line) or _CALLS.search(line)
                if sub:
                    a, b = walk(sub.group(1), mult, depth + 1, optional, via or name)
                    lo, hi = lo + a, hi + b
            elif opcode == "async-start":
                sub = _CALLS.search(line)
                if sub:
                    a, b = walk(sub.group(1), mult, depth + 1, optional, via)
                    lo, hi = lo + a, hi + b
            elif opcode not in _FREE_OPS and not opcode.endswith("-done"):
                kind = _kernel_kind(opcode, line, comps)
                entry_ = instructions.setdefault(name, {"kind": kind, "launches": 0.0,
                                                        "optional": optional, "via": via})
                entry_["launches"] += mult
                lo, hi = lo + mult, hi + mult
        return lo, hi

    lo, hi = walk(entry, 1.0)
    by_kind: dict[str, float] = defaultdict(float)
    for ins in instructions.values():
        by_kind[ins["kind"]] += ins["launches"]
    return {"launches_min": lo, "launches_max": hi, "by_kind": dict(by_kind),
            "instructions": instructions, **stats}


_COMMAND_BUFFER = re.compile(r"^command_buffer(_\d+)?$")


def completeness(events: list[dict], steps: int, hlo_text: str, threshold: float = 0.8,
                 calls_report_kernels: bool = False) -> dict:
    """How much of the program the trace caught: captured kernel events vs the launches the
    compiled HLO needs per step (expected_kernels), and the fraction of kernel-launching HLO
    instructions with at least one captured event (overall and per kind: gemm, fusion, ...;
    instructions inside conditional branches, and those inside a `call` (XLA command buffer)
    whose name the events carry instead of theirs, are left out of this coverage).

    Memset events are not counted as kernels. Instructions inside a `call` whose name the
    events carry (XLA GPU command buffers; CPU calls) are left out of the coverage; with
    `calls_report_kernels` (GPU: CUPTI reports every kernel of a CUDA graph, named after the
    command buffer) their launches still count in the event ratio, else (CPU: one event per
    call) those launches and events are left out of it. On GPU one instruction can launch several
    kernels (cuBLAS split-K, Triton multi-kernel fusions), so the event ratio can exceed 1; the
    instruction coverage is the sharper test. `complete` is False when the instruction
    coverage or the event ratio (to the cheapest branch choice) is below `threshold`.
    """
    exp = expected_kernels(hlo_text)
    kernel_events = [e for e in events if not _NOT_A_KERNEL.match(str(e.get("name", "")))]
    seen = {str((e.get("args") or {}).get("hlo_op", "")) for e in kernel_events}
    # Kernels run inside an XLA command buffer (CUDA graph) carry the command buffer's name,
    # not their own instruction's: those instructions cannot be checked one by one.
    seen_norm = {n.replace(".", "_") for n in seen}

    def in_seen_call(ins):
        return bool(ins["via"]) and ins["via"].replace(".", "_") in seen_norm

    per_kind = defaultdict(lambda: [0, 0])
    in_command_buffers, call_launches = 0, 0.0
    for name, ins in exp["instructions"].items():
        if in_seen_call(ins):
            in_command_buffers += 1
            call_launches += 0.0 if ins["optional"] else ins["launches"]
            continue
        if ins["optional"]:
            continue  # inside a conditional branch: may not have run
        per_kind[ins["kind"]][0] += 1
        per_kind[ins["kind"]][1] += name in seen
    # Events named after such a call are not counted against launches either (one event per
    # call on CPU, one per kernel of the CUDA graph on GPU): the ratio compares the rest.
    calls = {ins["via"].replace(".", "_") for ins in exp["instructions"].values()
             if in_seen_call(ins)}
    direct = [e for e in kernel_events
              if str((e.get("args") or {}).get("hlo_op", "")).replace(".", "_") not in calls]
    n_instr = sum(v[0] for v in per_kind.values())
    n_seen = sum(v[1] for v in per_kind.values())
    captured = len(kernel_events) / steps
    coverage = n_seen / n_instr if n_instr else None
    # GPU command buffers formed below the HLO (jax 0.11's thunk-level CUDA graphs): the events
    # carry a "command_buffer_N" that no HLO instruction or call has, so no instruction can be
    # matched by name; only the event count against the launches checks the trace then.
    known = {n.replace(".", "_") for n in exp["instructions"]} | calls
    unnamed = {n for n in seen_norm if _COMMAND_BUFFER.match(n) and n not in known}
    if calls_report_kernels and unnamed:
        in_command_buffers += n_instr - n_seen
        coverage = None
    if calls_report_kernels:
        direct, expected_direct = kernel_events, exp["launches_min"]
    else:
        expected_direct = exp["launches_min"] - call_launches
    ratio = len(direct) / steps / expected_direct if expected_direct > 0 else None
    complete = all(x is None or x >= threshold for x in (coverage, ratio))
    missing = sorted((n for n, ins in exp["instructions"].items()
                      if n not in seen and not ins["optional"] and not in_seen_call(ins)),
                     key=lambda n: -exp["instructions"][n]["launches"])
    return {
        "complete": complete, "threshold": threshold,
        "captured_kernels_per_step": captured,
        "expected_launches_per_step": [exp["launches_min"], exp["launches_max"]],
        "captured_over_expected": ratio,
        "instructions_expected": n_instr, "instructions_seen": n_seen,
        "instruction_coverage": coverage,
        "instructions_in_command_buffers": in_command_buffers,
        "unnamed_command_buffers": sorted(unnamed),
        "by_kind": {k: {"instructions": v[0], "seen": v[1],
                        "expected_launches_per_step": exp["by_kind"].get(k, 0.0)}
                    for k, v in sorted(per_kind.items())},
        "unknown_trip_counts": exp["unknown_trip_counts"], "conditionals": exp["conditionals"],
        "missing_examples": missing[:15],
    }


# ------------------------------------------------------------------------------ summarising

_COLLECTIVE_OPS = {"all-reduce", "all-reduce-start", "all-gather", "all-gather-start",
                   "reduce-scatter", "collective-permute", "collective-permute-start",
                   "all-to-all", "send", "recv"}
_DATA_MOVEMENT_OPS = {"copy", "transpose", "bitcast", "slice", "dynamic-slice",
                      "dynamic-update-slice", "concatenate", "pad", "broadcast", "reshape",
                      "gather", "scatter", "copy-start", "copy-done", "iota", "reverse"}


def categorize(name: str, hlo_op: str = "", ssd_source: bool = False,
               opcodes: tuple[str, ...] = ()) -> str:
    """Category of one kernel (one of CATEGORIES).

    Uses the kernel name, its HLO instruction name (`hlo_op`) and, when an HLO source map is
    given, whether the ops come from dimba_jax/ssd/ (`ssd_source`) and the HLO opcodes it runs.
    Order: collective, ssd, gemm, then reduction / copy / elementwise.
    """
    text = f"{name} {hlo_op}"
    ops = set(opcodes)
    if ops & _COLLECTIVE_OPS or re.search(r"nccl", name, re.I) or \
            (_COLLECTIVE.search(text) and not re.search(r"fusion", hlo_op or "", re.I)):
        return "collective"
    if _SSD.search(text) or ssd_source:
        return "ssd"
    if ops & {"dot", "convolution"} or _GEMM.search(text):
        return "gemm"
    if ops and ops != {"custom-call"}:
        if ops & {"reduce", "reduce-window", "sort"}:
            return "reduction"
        if ops <= _DATA_MOVEMENT_OPS:
            return "copy/transpose"
        return "elementwise/fusion"
    if _COPY.search(name) or _COPY.search(hlo_op.split(".")[0] if hlo_op else ""):
        return "copy/transpose"
    if _REDUCE.search(text):
        return "reduction"
    if _FUSION.search(text):
        return "elementwise/fusion"
    return "other"


def kernel_family(name: str) -> str:
    """A kernel name without its instance suffixes: "loop_add_fusion_12" / "fusion.3.clone"
    -> "loop_add_fusion" / "fusion" (so the many copies of one kind of fusion add up)."""
    fam = name
    while True:
        new = re.sub(r"(\.clone|[._\-]\d+)$", "", fam)
        if new == fam or not new:
            return fam
        fam = new


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def summarize(events: list[dict], info: dict, steps: int, step_ms: float | None = None,
              sources: dict[str, dict] | None = None, top: int = 30) -> dict:
    """Per-kernel summary of the selected device events of `steps` profiled steps.

    Args:
      events: from `select_device_events` (ts/dur in microseconds).
      steps: how many train steps the trace covers (times are divided by it).
      step_ms: wall time of one step measured outside the profiler (None: the trace's span
        from the first kernel start to the last kernel end, divided by `steps`).
      sources: `parse_hlo_sources(...)` of the program, for SSD / backward / function attribution.
    Returns:
      a JSON-able dict (see the module docstring).
    Raises:
      ValueError: steps < 1 or no events.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not events:
        raise ValueError("no kernel events to summarise")
    sources = sources or {}
    per_kernel = defaultdict(lambda: {"count": 0, "us": 0.0, "hlo_ops": set(), "category": ""})
    per_cat = defaultdict(lambda: [0, 0.0])
    per_func = defaultdict(float)
    per_op = defaultdict(lambda: [0, 0.0])
    direction = defaultdict(float)
    intervals = []
    for e in events:
        name = str(e.get("name", ""))
        dur = float(e.get("dur", 0.0))
        ts = float(e.get("ts", 0.0))
        args = e.get("args") if isinstance(e.get("args"), dict) else {}
        hlo_op = str(args.get("hlo_op", ""))
        attr = hlo_attribution(hlo_op, sources) if sources else \
            {"ssd": False, "backward": False, "function": "", "opcodes": (), "op": "", "frame": ""}
        cat = categorize(name, hlo_op, attr["ssd"], attr["opcodes"])
        k = per_kernel[name]
        k["count"] += 1
        k["us"] += dur
        k["category"] = k["category"] or cat
        if hlo_op and len(k["hlo_ops"]) < 3:
            k["hlo_ops"].add(hlo_op)
        per_cat[cat][0] += 1
        per_cat[cat][1] += dur
        if sources:
            per_func[attr["function"] or "(outside dimba_jax)"] += dur
            if not attr["function"]:
                key = (attr["frame"], attr["op"] or "(no op_name)")
                per_op[key][0] += 1
                per_op[key][1] += dur
            direction["backward" if attr["backward"] else "forward/optimizer"] += dur
        intervals.append((ts, ts + dur))
    total_us = sum(v["us"] for v in per_kernel.values())
    busy_us = _busy_us(intervals)
    span_us = max(e for _, e in intervals) - min(s for s, _ in intervals)
    wall_ms = float(step_ms) if step_ms else span_us / steps / 1e3
    kernel_ms = total_us / steps / 1e3
    busy_ms = busy_us / steps / 1e3

    def pct(ms):
        return 100.0 * ms / wall_ms if wall_ms > 0 else None

    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1]["us"])
    out = {
        "source": info.get("source"), "process": info.get("process"),
        "devices_in_trace": info.get("devices"), "lines": info.get("lines"),
        "line_events": info.get("line_events"),
        "steps": steps, "step_wall_ms": wall_ms,
        "step_wall_from": "measured" if step_ms else "trace span",
        "trace_span_ms_per_step": span_us / steps / 1e3,
        "kernel_ms_per_step": kernel_ms, "busy_ms_per_step": busy_ms,
        "idle_ms_per_step": wall_ms - busy_ms, "idle_pct": pct(wall_ms - busy_ms),
        "kernels_per_step": sum(v["count"] for v in per_kernel.values()) / steps,
        "distinct_kernels": len(per_kernel),
        "categories": [
            {"category": c, "count_per_step": per_cat[c][0] / steps,
             "ms_per_step": per_cat[c][1] / steps / 1e3,
             "pct_of_step": pct(per_cat[c][1] / steps / 1e3),
             "pct_of_kernel_time": 100.0 * per_cat[c][1] / total_us if total_us else None}
            for c in CATEGORIES if c in per_cat],
        "top_kernels": [
            {"name": n, "category": v["category"], "count_per_step": v["count"] / steps,
             "ms_per_step": v["us"] / steps / 1e3, "pct_of_step": pct(v["us"] / steps / 1e3),
             "mean_us": v["us"] / v["count"], "hlo_ops": sorted(v["hlo_ops"])}
            for n, v in kernels[:top]],
    }
    families = defaultdict(lambda: [0, 0.0, ""])
    for n, v in per_kernel.items():
        fam = kernel_family(n)
        families[fam][0] += v["count"]
        families[fam][1] += v["us"]
        families[fam][2] = families[fam][2] or v["category"]
    out["top_families"] = [
        {"family": f, "category": c, "count_per_step": cnt / steps, "ms_per_step": us / steps / 1e3,
         "pct_of_step": pct(us / steps / 1e3)}
        for f, (cnt, us, c) in sorted(families.items(), key=lambda kv: -kv[1][1])[:15]]
    if sources:
        out["direction"] = {k: {"ms_per_step": v / steps / 1e3, "pct_of_kernel_time":
                                100.0 * v / total_us if total_us else None}
                            for k, v in sorted(direction.items())}
        out["by_function"] = [{"function": f, "ms_per_step": v / steps / 1e3,
                               "pct_of_kernel_time": 100.0 * v / total_us if total_us else None}
                              for f, v in sorted(per_func.items(), key=lambda kv: -kv[1])[:20]]
        out["outside_by_op"] = [{"frame": f, "op": o, "count_per_step": cnt / steps,
                                 "ms_per_step": us / steps / 1e3,
                                 "pct_of_kernel_time": 100.0 * us / total_us if total_us else None}
                                for (f, o), (cnt, us) in sorted(per_op.items(),
                                                           key=lambda kv: -kv[1][1])[:25]]
    return out


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _completeness_lines(c: dict | None, total_events: int | None) -> list[str]:
    """Markdown lines of the completeness check (a loud banner when the trace is incomplete)."""
    out = []
    if total_events is not None and total_events >= 0.999 * VIEWER_DEFAULT_MAX_EVENTS and \
            total_events <= VIEWER_DEFAULT_MAX_EVENTS:
        out += [f"**WARNING: the trace JSON holds {total_events:,} events, the trace viewer's "
                "default cap (TF_PROFILER_TRACE_VIEWER_MAX_EVENTS): later events were cut.**", ""]
    if not c:
        return out + ["Completeness: not checked (no HLO text of the program).", ""]
    lo, hi = c["expected_launches_per_step"]
    rng = f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"
    cov = "—" if c["instruction_coverage"] is None else f"{100 * c['instruction_coverage']:.0f}%"
    ratio = "—" if c["captured_over_expected"] is None else f"{100 * c['captured_over_expected']:.0f}%"
    kinds = ", ".join(f"{k} {v['seen']}/{v['instructions']}" for k, v in c["by_kind"].items())
    head = ("**INCOMPLETE TRACE: the profiler dropped events; per-kernel times, categories and "
            "the idle gap below are NOT trustworthy.**" if not c["complete"] else
            "Completeness: OK.")
    out += [head, "",
            f"- captured {c['captured_kernels_per_step']:.0f} kernels/step vs {rng} launches/step "
            f"expected from the compiled HLO ({ratio}); HLO kernel instructions with at least one "
            f"captured event: {c['instructions_seen']}/{c['instructions_expected']} ({cov}); by "
            f"kind (seen/expected): {kinds}",
            f"- HLO kernel instructions inside command buffers (checked by count only): "
            f"{c.get('instructions_in_command_buffers', 0)}"
            + (f" (events named {', '.join(c['unnamed_command_buffers'])}, a command buffer the "
               f"HLO text does not show: instructions not matched by name)"
               if c.get("unnamed_command_buffers") else "") + "; "
            f"while loops without a known trip count: {c['unknown_trip_counts']}; conditionals: "
            f"{c['conditionals']}" + (f"; e.g. missing: {', '.join(c['missing_examples'][:6])}"
                                      if c["missing_examples"] else ""), ""]
    return out


def to_markdown(summary: dict, title: str = "Profile summary") -> str:
    """Markdown tables of a `summarize` result."""
    s = summary
    lines = [f"# {title}", ""] + _completeness_lines(s.get("completeness"),
                                                     s.get("trace_events_total")) + [
             f"Trace: {s['source']} events of `{s['process']}` ({len(s['lines'] or [])} lines), "
             f"{s['steps']} steps" + (
                 "; device lines (events): " + ", ".join(
                     f"{k} ({v})" for k, v in s["line_events"].items())
                 if s.get("line_events") else "") +
             f". Step wall time {_fmt(s['step_wall_ms'])} ms "
             f"({s['step_wall_from']}); trace span {_fmt(s['trace_span_ms_per_step'])} ms/step.", "",
             f"- kernel time (sum) {_fmt(s['kernel_ms_per_step'])} ms/step; busy (union of "
             f"streams) {_fmt(s['busy_ms_per_step'])} ms/step; **idle gap "
             f"{_fmt(s['idle_ms_per_step'])} ms/step ({_fmt(s['idle_pct'], '.1f')}%)**",
             f"- {_fmt(s['kernels_per_step'], '.0f')} kernels per step, "
             f"{s['distinct_kernels']} distinct", "",
             "| category | kernels/step | ms/step | % of step | % of kernel time |",
             "|---|---|---|---|---|"]
    for c in s["categories"]:
        lines.append(f"| {c['category']} | {_fmt(c['count_per_step'], '.0f')} | "
                     f"{_fmt(c['ms_per_step'])} | {_fmt(c['pct_of_step'], '.1f')} | "
                     f"{_fmt(c['pct_of_kernel_time'], '.1f')} |")
    if s.get("direction"):
        lines += ["", "| direction | ms/step | % of kernel time |", "|---|---|---|"]
        for k, v in s["direction"].items():
            lines.append(f"| {k} | {_fmt(v['ms_per_step'])} | {_fmt(v['pct_of_kernel_time'], '.1f')} |")
    if s.get("by_function"):
        lines += ["", "| innermost dimba_jax function | ms/step | % of kernel time |", "|---|---|---|"]
        for f in s["by_function"]:
            lines.append(f"| {f['function']} | {_fmt(f['ms_per_step'])} | "
                         f"{_fmt(f['pct_of_kernel_time'], '.1f')} |")
    if s.get("outside_by_op"):
        lines += ["", "Kernels outside dimba_jax by their innermost source frame and the last "
                  "three parts of their JAX op_name:", "",
                  "| frame | op_name | kernels/step | ms/step | % of kernel time |",
                  "|---|---|---|---|---|"]
        for o in s["outside_by_op"]:
            lines.append(f"| `{o.get('frame') or '—'}` | `{o['op'][:120]}` | "
                         f"{_fmt(o['count_per_step'], '.1f')} | "
                         f"{_fmt(o['ms_per_step'], '.3f')} | {_fmt(o['pct_of_kernel_time'], '.1f')} |")
    if s.get("top_families"):
        lines += ["", "Kernel families (instance suffixes stripped):", "",
                  "| family | category | count/step | ms/step | % of step |", "|---|---|---|---|---|"]
        for f in s["top_families"]:
            lines.append(f"| `{f['family'][:90]}` | {f['category']} | "
                         f"{_fmt(f['count_per_step'], '.1f')} | {_fmt(f['ms_per_step'], '.3f')} | "
                         f"{_fmt(f['pct_of_step'], '.1f')} |")
    lines += ["", f"Top {len(s['top_kernels'])} kernels:", "",
              "| kernel | category | count/step | ms/step | % of step | mean us | HLO ops |",
              "|---|---|---|---|---|---|---|"]
    for k in s["top_kernels"]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"| `{name}` | {k['category']} | {_fmt(k['count_per_step'], '.1f')} | "
                     f"{_fmt(k['ms_per_step'], '.3f')} | {_fmt(k['pct_of_step'], '.1f')} | "
                     f"{_fmt(k['mean_us'], '.1f')} | {', '.join(k['hlo_ops'])} |")
    return "\n".join(lines) + "\n"


HLO_FILE = "program.hlo.txt"  # where benchmarks/train_throughput.py saves the traced program


def summarize_dir(profile_dir: str, steps: int, step_ms: float | None = None,
                  hlo_text: str | None = None, top: int = 30) -> dict:
    """find_trace_file + load_events + select_device_events + summarize (+ HLO sources) +
    the completeness check (HLO text from `hlo_text`, else PROFILE_DIR/program.hlo.txt)."""
    path = find_trace_file(profile_dir)
    all_events = load_events(path)
    events, info = select_device_events(all_events)
    if hlo_text is None:
        saved = os.path.join(profile_dir, HLO_FILE)
        if os.path.isfile(saved):
            with open(saved) as f:
                hlo_text = f.read()
    sources = parse_hlo_sources(hlo_text) if hlo_text else None
    summary = summarize(events, info, steps, step_ms, sources, top)
    summary["trace_file"] = os.path.relpath(path, profile_dir)
    summary["trace_events_total"] = len(all_events)
    summary["completeness"] = None
    if hlo_text:
        try:
            summary["completeness"] = completeness(
                events, steps, hlo_text, calls_report_kernels=info.get("source") == "device")
        except ValueError as e:
            summary["completeness_error"] = str(e)
    return summary


def write_summary(summary: dict, prefix: str, title: str = "Profile summary") -> None:
    """Writes PREFIX.json and PREFIX.md."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(to_markdown(summary, title))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile_dir")
    p.add_argument("--steps", type=int, default=1, help="train steps the trace covers")
    p.add_argument("--step-ms", type=float, default=0.0, help="measured step wall time (0 = span)")
    p.add_argument("--hlo", default="", help="compiled HLO text of the program (optional)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default="", help="output prefix: PREFIX.json + PREFIX.md")
    args = p.parse_args(argv)
    hlo = None
    if args.hlo:
        if not os.path.isfile(args.hlo):
            raise FileNotFoundError(f"--hlo {args.hlo!r} not found")
        with open(args.hlo) as f:
            hlo = f.read()
    s = summarize_dir(args.profile_dir, args.steps, args.step_ms or None, hlo, args.top)
    if args.out:
        write_summary(s, args.out)
    print(to_markdown(s))
    return s


if __name__ == "__main__":
    main()
