"""dimba_jax beside mamba_ssm, timed in one device call: one results file of record.

Writes one JSON file (`--out`, on the GPU machine `$OUT/vs_mamba_ssm_h200.json`):

    {"device", "command", "call_id", "started_utc", "finished_utc", "elapsed_s", "budget_s",
     "jax", "smoke", "peer_versions", "skipped": [...], "failed": [...], "peer_runs": [...],
     "rows": [...]}

one row per measurement, every row stamped with the call's `call_id` (all rows of a file come
from this one process; the driver never reads or merges another results file and refuses to
write over an existing one):

    {"what": "ssd", "system", "shape", "fwd_ms", "fwdbwd_ms", "call_id", "detail"}
    {"what": "train_step", "system", "model", "ms", "tokens_per_s", "mfu", "call_id", "detail"}
    {"what": "generate_1024_b1", "system", "model", "steps", "ms", "call_id", "detail"}

system "dimba_jax" | "mamba_ssm"; model "dimba_base" (configs/base.py), "ar_base"
(configs/ar_base.py), "mamba2_130m" (the peer's Mamba-2 LM, d 768, 24 layers); shape
"130m-L2k" | "130m-L8k" | "1.3b-L2k" | "130m-L32k" (benchmarks/ssd_pallas_bench.py SHAPES:
bf16, headdim 64, d_state 128, one group, chunk 256); steps = T of DIMBA's DDIM sampler or
1024 (one per token) for an AR model. `detail` holds what else was measured or set (impl,
sizes, compile seconds, the peer's own fields). The Markdown table and the plot come from
`python -m benchmarks.vs_mamba_ssm_report` (ratios computed only within one file).

What is timed, by part in the order --parts gives (default: as numbered below; each item
starts only if its expected time, ITEM_SECONDS, fits
in what is left of --budget-s; an item that does not fit is listed in "skipped", one that
raises in "failed", and the rest still runs; the file is rewritten after every row):
  1. SSD, ours: `ssd(impl=--ssd-impl)` forward and forward+backward (vjp w.r.t. x, dt, A, B, C,
     D with dt_bias + softplus) at the four shapes, with the Pallas kernels of --ssd-kernels
     ("default": `ssd()`'s own KernelConfig, the dt prologue kernel in the forward-only calls;
     "model": the KernelConfig that --dimba-config's models run, whose forward-only chunk is
     the sampler's 128), timed by ssd_pallas_bench.time_ms (wall time of
     --ssd-inner back-to-back calls + one block_until_ready, median of --ssd-runs).
  2. SSD, the peer: `anchor_ssd_torch.py` (mamba_chunk_scan_combined; triton do_bench and the
     same wall-of-5 method as ours); fwd_ms / fwdbwd_ms per --peer-ssd-time.
  3. Train steps: the peer's `anchor_train_torch.py` (130M, 16 x 1024 tokens, eager PyTorch,
     bf16 autocast, fused AdamW), then ours by train_throughput.measure (the real jitted,
     donated train step, AdamW + EMA, synthetic tokens; --per-device-batch x seq_len 1024) for
     configs/base.py and configs/ar_base.py. MFU of every row = tokens/s x the documented
     training FLOPs per token (dimba_jax.models.flops; for the peer, of its architecture
     PEER_130M with its vocabulary) / the device's bf16 peak (the same peak for both).
  4. Batch-1 generation of 1024 tokens: the peer's `anchor_ar_decode_torch.py` (CUDA-graph
     generate(), 32-token prompt), then ours as the Pareto harness times it (timing.time_call
     of DimbaGenerator / ArGenerator.generate, random weights, unprompted, median of
     --gen-repeats): DIMBA base at T in --dimba-steps (DDIM), the AR base at 1024 steps.
Within 3 and 4 the peer goes first: its rows are cheap and every ratio needs them.
The peer runs as subprocesses (`python <peer-dir>/anchor_*.py`, PYTHONPATH=<peer-dir>, OUT = a
fresh temporary folder); it is never imported here. Each anchor prints one JSON line per case;
the driver reads them as they come and stops the anchor once it has every case it needs (the
anchors also time 370M models, which are not rows here), or at its time limit (--peer-max-s or
the budget). This process keeps --jax-mem-fraction of the GPU memory; the peer uses the rest.

Device commands (one H200). Everything takes ~610 s of a 600 s command limit (measured: the
peer's SSD anchor 141 s and train anchor 104 s, most of it Triton autotuning; our SSD, DIMBA and
AR train steps 256 s with compiles), so it runs as two chained calls, each its own file with its
own call_id (every ratio within one file, so within one call). Before them, here (both folders are
git-ignored):

    mkdir -p .peer .whl && cp -r ../shared/peer/. .peer/ && cp ../shared/wheels-gpu/*.whl .whl/

then, with carry [".peer", ".whl"], call 1 (~8.5 min) and, at once after it, call 2 (~2 min):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    timeout 575 python3 -m benchmarks.vs_mamba_ssm --parts ssd,train_step \
        --out $OUT/vs_mamba_ssm_h200.json --budget-s 555
    (same preamble); timeout 300 python3 -m benchmarks.vs_mamba_ssm --parts generate \
        --out $OUT/vs_mamba_ssm_generate_h200.json --budget-s 280

Afterwards, here: copy both files to benchmarks/results/ and run
`python -m benchmarks.vs_mamba_ssm_report` (table + docs/vs_mamba_ssm_h200.png) and
`python -m benchmarks.vs_mamba_ssm_report --results benchmarks/results/vs_mamba_ssm_generate_h200.json
--plot docs/vs_mamba_ssm_generate_h200.png`. A call that stopped short keeps its rows and says
what it skipped; a second call (a new file: files are never merged) finds its compiled programs
in the XLA compilation cache (--compile-cache) if the machine is still warm.

`--smoke`: the whole pipeline on CPU in under a minute (tiny shapes and models, the shape names kept;
the peer is tests/fake_peer/, stand-in scripts that print JSON in the anchors' format).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import types
import uuid

from benchmarks import vs_mamba_ssm_report as report
from benchmarks.vs_mamba_ssm_report import SHAPE_NAMES

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Expected seconds of each item on one H200 (compile + timing), from the call of record
# (benchmarks/results/vs_mamba_ssm_h200.json: the peer's anchors 141 s and 104 s, the base train
# step's compile 80 s) plus margin. An item starts only if this fits in what is left of --budget-s.
ITEM_SECONDS = {
    "ssd:dimba_jax": 50, "ssd:mamba_ssm": 150,
    "train_step:mamba_ssm": 110, "train_step:dimba_base": 110, "train_step:ar_base": 70,
    "generate:mamba_ssm": 30, "generate:dimba_base": 50, "generate:ar_base": 25,
}
GEN_TOKENS = 1024  # batch-1 generation length of the rows (the peer's anchor case); 16 with --smoke
PEER_SCRIPTS = {"ssd": "anchor_ssd_torch.py", "train_step": "anchor_train_torch.py",
                "generate": "anchor_ar_decode_torch.py"}
# The model of anchor_train_torch.py / anchor_ar_decode_torch.py ("130m"): mamba_ssm's
# MambaConfig(d_model=768, n_layer=24, vocab_size=50277) with Mamba2 layers at their defaults;
# mamba_ssm pads the vocabulary to a multiple of 8.
PEER_130M = types.SimpleNamespace(d_model=768, n_layers=24, expand=2, headdim=64, d_state=128,
                                  ngroups=1, d_conv=4, chunk_size=256)
PEER_VOCAB = 50280
# --smoke: config overrides that make a config tiny (CPU, seconds).
SMOKE_MODEL = [("model.d_model", "32"), ("model.n_layers", "1"), ("model.d_state", "8"),
               ("model.headdim", "16"), ("model.chunk_size", "16"), ("model.time_embed_dim", "32"),
               ("model.compute_dtype", "float32"), ("model.ssd_impl", "xla"),
               ("data.tokenizer", "byte")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/vs_mamba_ssm_h200.json",
                   help="results JSON to write (must not exist: a file of record is one call)")
    p.add_argument("--budget-s", type=float, default=520.0,
                   help="wall-clock budget of the whole call; items that would pass it are skipped")
    p.add_argument("--parts", default="ssd,train_step,generate",
                   help="comma list of ssd, train_step, generate, run in the order given (what "
                        "comes last is what a short budget skips)")
    p.add_argument("--peer-dir", default="",
                   help="folder with mamba_ssm/ and the anchor_*.py scripts (default .peer; "
                        "tests/fake_peer with --smoke)")
    p.add_argument("--peer-max-s", type=float, default=240.0, help="stop a peer script after this long")
    p.add_argument("--peer-ssd-time", choices=("best", "do_bench", "wall5"), default="best",
                   help="the peer's SSD time of a row: triton do_bench (GPU time, L2 flushed), "
                        "wall5 (our method), or best = the smaller of the two")
    p.add_argument("--ssd-impl", default="auto", help="impl of our ssd() (auto: what the models use)")
    p.add_argument("--ssd-kernels", default="default", choices=("default", "model"),
                   help="our ssd()'s KernelConfig: ssd()'s default or that of --dimba-config's "
                        "models (model)")
    p.add_argument("--ssd-runs", type=int, default=30, help="timed samples per SSD case (median)")
    p.add_argument("--ssd-inner", type=int, default=5, help="back-to-back calls per SSD sample")
    p.add_argument("--dimba-config", default="configs/base.py")
    p.add_argument("--ar-config", default="configs/ar_base.py")
    p.add_argument("--per-device-batch", type=int, default=16, help="train step: sequences per step")
    p.add_argument("--train-steps", type=int, default=10, help="timed train steps per window")
    p.add_argument("--train-repeats", type=int, default=3, help="timed windows (median)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed train steps (after compile)")
    p.add_argument("--dimba-steps", default="64,16", help="DIMBA DDIM step counts T")
    p.add_argument("--gen-repeats", type=int, default=5, help="timed generation calls (median)")
    p.add_argument("--jax-mem-fraction", type=float, default=0.5,
                   help="share of GPU memory this process preallocates (the peer needs the rest)")
    p.add_argument("--compile-cache", default="runs/jax_cache",
                   help="persistent XLA compilation cache ('' = off; not used with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shapes and models, the stand-in peer (tests)")
    args = p.parse_args(argv)
    args.parts = list(dict.fromkeys(s.strip() for s in args.parts.split(",") if s.strip()))
    unknown = set(args.parts) - set(PEER_SCRIPTS)
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; known {list(PEER_SCRIPTS)}")
    args.dimba_steps = [int(s) for s in args.dimba_steps.split(",") if s.strip()]
    if not args.peer_dir:
        args.peer_dir = os.path.join(ROOT, "tests", "fake_peer") if args.smoke else ".peer"
    if args.smoke:
        args.ssd_runs, args.ssd_inner, args.per_device_batch = 3, 2, 2
        args.train_steps, args.train_repeats, args.train_warmup = 2, 1, 1
        args.dimba_steps, args.gen_repeats = [2, 1], 2
    args.L_gen = 16 if args.smoke else GEN_TOKENS
    return args


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Call:
    """The results document of this call and the budget clock; `write()` after every change."""

    def __init__(self, args, argv):
        self.args = args
        self.t0 = time.perf_counter()
        command = "python3 -m benchmarks.vs_mamba_ssm " + shlex.join(argv)
        if os.environ.get("OUT"):  # the device's output folder, as the command was typed
            command = command.replace(os.environ["OUT"], "$OUT")
        self.doc = {"device": None, "command": command,
                    "call_id": uuid.uuid4().hex, "started_utc": utc_now(), "finished_utc": None,
                    "elapsed_s": 0.0, "budget_s": args.budget_s, "jax": None,
                    "smoke": bool(args.smoke), "skipped": [], "failed": [], "peer_runs": [],
                    "rows": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def fits(self, item: str) -> bool:
        """True if ITEM_SECONDS[item] (0 with --smoke) fits in the budget left; otherwise
        records the skip."""
        need = 0 if self.args.smoke else ITEM_SECONDS[item]
        if need <= self.left():
            return True
        self.doc["skipped"].append({"item": item, "why": f"{self.left():.0f}s of the budget left, "
                                                         f"needs about {need}s"})
        print(f"[vs] skipped {item}: {self.doc['skipped'][-1]['why']}", flush=True)
        self.write()
        return False

    def add(self, row: dict) -> None:
        row = json.loads(json.dumps(dict(row, call_id=self.doc["call_id"])))  # as the file holds it
        self.doc["rows"].append(row)
        print("[vs] row " + json.dumps({k: v for k, v in row.items() if k != "detail"}), flush=True)
        self.write()

    def fail(self, item: str, e: BaseException) -> None:
        traceback.print_exc()
        self.doc["failed"].append({"item": item, "error": f"{type(e).__name__}: {str(e)[:800]}"})
        self.write()

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        path = self.args.out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the peer
def run_peer(call: Call, part: str, done) -> list[dict]:
    """Runs the peer's anchor script of `part` as a subprocess and returns its JSON records.

    The script is `<peer-dir>/PEER_SCRIPTS[part]`, run with PYTHONPATH=<peer-dir> (only) and
    OUT = a fresh temporary folder. Records are its stdout lines that parse as JSON objects. It is
    stopped once `done(records)` is true, or after --peer-max-s / the budget; what it printed
    until then is kept. Appends {"script", "wall_s", "returncode", "stopped", "records",
    "tail"} to the document's "peer_runs".
    """
    args = call.args
    peer_dir = os.path.abspath(args.peer_dir)
    script = os.path.join(peer_dir, PEER_SCRIPTS[part])
    if not os.path.isfile(script):
        raise FileNotFoundError(f"peer script {script!r} not found (copy ../shared/peer/ to "
                                f"{args.peer_dir!r} and name it in carry)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=peer_dir)  # as the peer's README runs it
    records, tail = [], []
    t0 = time.perf_counter()
    stop_at = t0 + max(1.0, min(args.peer_max_s, call.left()))
    stopped = "exited"
    with tempfile.TemporaryDirectory(prefix="peer_out_") as out_dir:
        env["OUT"] = out_dir
        proc = subprocess.Popen([sys.executable, script], env=env, cwd=out_dir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        fd = proc.stdout.fileno()  # read unbuffered: select() sees only what is not yet read
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        pending, eof = b"", False
        try:
            while not eof:
                if done(records):
                    stopped = "had every case it is needed for"
                    break
                remaining = stop_at - time.perf_counter()
                if remaining <= 0:
                    stopped = "time limit"
                    break
                if not sel.select(timeout=min(remaining, 5.0)):
                    continue
                chunk = os.read(fd, 1 << 16)
                eof = not chunk
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if eof:
                    lines.append(pending)
                for text in (ln.decode(errors="replace").strip() for ln in lines):
                    try:
                        rec = json.loads(text) if text.startswith("{") else None
                    except json.JSONDecodeError:
                        rec = None
                    if isinstance(rec, dict):
                        records.append(rec)
                        print(f"[peer {part}] {text}", flush=True)
                    elif text:
                        tail = (tail + [text])[-30:]
        finally:
            sel.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    run = {"script": PEER_SCRIPTS[part], "wall_s": round(time.perf_counter() - t0, 1),
           "returncode": proc.returncode, "stopped": stopped, "records": len(records),
           "tail": tail[-12:] if not done(records) else []}
    call.doc["peer_runs"].append(run)
    print(f"[peer {part}] {run['stopped']} after {run['wall_s']}s ({len(records)} records)", flush=True)
    if not done(records):
        print("\n".join(tail), flush=True)
    return records


def peer_versions(peer_dir: str) -> dict:
    """{"torch", "triton", "gpu"} of the peer's Python (a subprocess with PYTHONPATH=peer_dir),
    or {"error": ...}."""
    code = ("import json, torch, triton; print(json.dumps({'torch': torch.__version__, "
            "'triton': triton.__version__, 'gpu': torch.cuda.get_device_name(0)}))")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(peer_dir))
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-300:]}
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - a note in the file, not a failure of the call
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def peer_ssd_rows(records: list[dict], how: str) -> list[dict]:
    """Rows of anchor_ssd_torch.py's records (one per shape name in SHAPE_NAMES).

    how: "do_bench" (its fwd_ms / fwdbwd_ms), "wall5" (fwd_ms_wall5 / fwdbwd_ms_wall5, the
    method of our rows) or "best" (the smaller of the two, per column).
    """
    rows = []
    for r in records:
        if r.get("name") not in SHAPE_NAMES:
            continue
        pick = {}
        for col in ("fwd_ms", "fwdbwd_ms"):
            bench, wall = float(r[col]), float(r[col + "_wall5"])
            pick[col] = {"do_bench": bench, "wall5": wall, "best": min(bench, wall)}[how]
        rows.append({"what": "ssd", "system": "mamba_ssm", "shape": r["name"], **pick,
                     "detail": dict(r, time=how, script=PEER_SCRIPTS["ssd"])})
    return rows


def peer_train_flops_per_token(seq_len: int) -> float:
    """Training FLOPs per token of the peer's 130M LM, by dimba_jax.models.flops (the count our
    rows use): PEER_130M blocks + the PEER_VOCAB x 768 head, x 3 for training."""
    from dimba_jax.models import flops as flops_lib

    fwd = flops_lib.mamba2_lm_forward_flops(PEER_130M, vocab_size=PEER_VOCAB, seq_len=seq_len)
    return flops_lib.training_flops(fwd)


def peer_train_rows(records: list[dict], peak: float | None) -> list[dict]:
    """The train_step row of anchor_train_torch.py's "130m" record (its 370m one is not a row).
    mfu: tokens/s x peer_train_flops_per_token / peak (None without a known peak); the
    script's own 6ND figure stays in detail["mfu_6nd"]."""
    from dimba_jax.models import flops as flops_lib

    rows = []
    for r in records:
        if r.get("model") != "130m":
            continue
        tps = float(r["tokens_per_s"])
        fpt = peer_train_flops_per_token(int(r["L"]))
        rows.append({"what": "train_step", "system": "mamba_ssm", "model": "mamba2_130m",
                     "ms": float(r["step_ms"]), "tokens_per_s": tps,
                     "mfu": flops_lib.mfu(tps, fpt, 1, peak),
                     "detail": dict(r, train_flops_per_token=fpt, script=PEER_SCRIPTS["train_step"])})
    return rows


def _is_peer_decode_case(r: dict) -> bool:
    return r.get("model") == "130m" and r.get("batch") == 1 and r.get("gen") == GEN_TOKENS


def peer_generate_rows(records: list[dict]) -> list[dict]:
    """The generate_1024_b1 row of anchor_ar_decode_torch.py's 130m, batch 1, 1024-token record."""
    return [{"what": "generate_1024_b1", "system": "mamba_ssm", "model": "mamba2_130m",
             "steps": int(r["gen"]), "ms": float(r["ar_decode_ms"]),
             "detail": dict(r, script=PEER_SCRIPTS["generate"])}
            for r in records if _is_peer_decode_case(r)]


# ----------------------------------------------------------------------------- ours
def ssd_geometry(args) -> tuple[list[tuple[str, int, int, int]], int, int, int]:
    """([(shape name, batch, seqlen, nheads)], headdim, dstate, chunk): ssd_pallas_bench's four
    shapes, or with --smoke the same names at (1, 64, 2) with headdim 16, dstate 16, chunk 16."""
    from benchmarks import ssd_pallas_bench as sb

    if args.smoke:
        return [(name, 1, 64, 2) for name in SHAPE_NAMES], 16, 16, 16
    shapes = list(sb.SHAPES)
    assert tuple(s[0] for s in shapes) == SHAPE_NAMES, shapes
    return shapes, sb.P, sb.N, sb.CHUNK


def our_ssd_rows(call: Call) -> None:
    """Times our ssd() at every shape (bf16), forward and forward+backward; one row each."""
    import jax
    import jax.numpy as jnp

    from benchmarks import ssd_pallas_bench as sb
    from dimba_jax.ssd import KernelConfig, resolve_impl, ssd

    args = call.args
    shapes, p, n, chunk = ssd_geometry(args)
    kernels = (KernelConfig.from_config(_gen_config(args, args.dimba_config).model)
               if args.ssd_kernels == "model" else KernelConfig())

    def fn(x, dt, A, B, C, D=None, dt_bias=None):
        return ssd(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, impl=args.ssd_impl,
                   kernels=kernels)

    jitted = {}  # (batch, seqlen, nheads) -> (forward, forward+backward) programs
    for name, b, l, h in shapes:
        inputs, dy = sb.make_inputs(jax.random.key(SHAPE_NAMES.index(name)), b, l, h,
                                    jnp.bfloat16, p, n, 1)
        xs = [inputs[k] for k in sb.ARGS]
        chosen, reason = resolve_impl(args.ssd_impl, x=xs[0], dt=xs[1], A=xs[2], B=xs[3], C=xs[4],
                                      chunk_size=chunk, D=xs[5], dt_bias=xs[6], dt_softplus=True)
        f_fwd, f_fb = jitted.setdefault((b, l, h), (sb.fwd_fn(fn), sb.fwdbwd_fn(fn)))
        fwd = sb.time_ms(f_fwd, xs, args.ssd_runs, args.ssd_inner)
        fb = sb.time_ms(f_fb, [dy] + xs, args.ssd_runs, args.ssd_inner)
        call.add({"what": "ssd", "system": "dimba_jax", "shape": name, "fwd_ms": fwd[0],
                  "fwdbwd_ms": fb[0],
                  "detail": {"impl": args.ssd_impl, "resolved_impl": chosen, "why": reason,
                             "kernels": f"{args.ssd_kernels}: {kernels}",
                             "B": b, "L": l, "H": h, "P": p, "N": n, "chunk": chunk,
                             "dtype": "bfloat16", "fwd_p10_p90": list(fwd[1:]), "fwdbwd_p10_p90": list(fb[1:]),
                             "time": f"wall of {args.ssd_inner} back-to-back calls + one sync, "
                                     f"median of {args.ssd_runs}"}})


def our_train_row(call: Call, model: str, config: str) -> None:
    """train_throughput.measure of `config` at --per-device-batch x 1024 on one device."""
    from benchmarks import train_throughput as tt

    args = call.args
    ns = argparse.Namespace(config=config, per_device_batch=args.per_device_batch,
                            seq_len=32 if args.smoke else 0, devices=1, steps=args.train_steps,
                            repeats=args.train_repeats, warmup=args.train_warmup)
    r = tt.measure(ns, SMOKE_MODEL if args.smoke else [], variant=model)
    keep = ("config", "overrides", "params", "global_batch", "seq_len", "compute_dtype", "ssd_impl",
            "step_ms_windows", "train_flops_per_token", "peak_tflops_per_device", "compile_s",
            "loss_after_warmup", "memory")
    call.add({"what": "train_step", "system": "dimba_jax", "model": model, "ms": r["step_ms"],
              "tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"],
              "detail": {k: r.get(k) for k in keep}})


def _gen_config(args, path: str):
    from dimba_jax.train import overrides as ov

    return ov.apply_overrides(ov.load_config_file(path), SMOKE_MODEL if args.smoke else [])


def our_generate_rows(call: Call, model: str) -> None:
    """Batch-1 generation of GEN_TOKENS tokens (16 with --smoke), unprompted, random weights, timed as the Pareto
    harness does (timing.time_call of the generator's generate): DIMBA DDIM at each T of
    --dimba-steps (model "dimba_base") or the AR LM decoding L_gen tokens (model "ar_base")."""
    from dimba_jax.evaluate import loading, timing
    from dimba_jax.evaluate.generators import ArGenerator, DimbaGenerator
    from dimba_jax.evaluate.harness import RunSpec

    args = call.args
    L = int(args.L_gen)
    if model == "dimba_base":
        cfg = _gen_config(args, args.dimba_config)
        net, _, tok = loading.fresh_model(cfg, seed=0)
        gen = DimbaGenerator(net, cfg, tok)
        specs = [RunSpec("dimba", "ddim", t, L, False) for t in args.dimba_steps]
        config = args.dimba_config
    else:
        cfg = _gen_config(args, args.ar_config)
        net, _, tok = loading.fresh_model(cfg, seed=1)
        gen = ArGenerator.from_config(net, cfg, tok)
        specs = [RunSpec("ar", "ar", L, L, False)]
        config = args.ar_config
    for spec in specs:
        t = timing.time_call(gen.generate, spec, None, 1, 0, repeats=args.gen_repeats)
        call.add({"what": "generate_1024_b1", "system": "dimba_jax", "model": model,
                  "steps": int(spec.steps), "ms": t.median_ms,
                  "detail": {"config": config, "sampler": spec.sampler, "L_gen": L, "batch": 1,
                             "prompt": 0, "times_ms": t.times_ms, "compile_s": t.compile_s,
                             "ssd_impl": str(cfg.model.ssd_impl),
                             "compute_dtype": str(cfg.model.compute_dtype)}})
    del gen, net
    gc.collect()


# ----------------------------------------------------------------------------- driver
def _item(call: Call, name: str, fn, *a) -> None:
    """Runs fn(*a) if ITEM_SECONDS[name] fits the budget; a failure is recorded, not raised."""
    if not call.fits(name):
        return
    t0 = time.perf_counter()
    print(f"[vs] {name} ({call.left():.0f}s of the budget left)", flush=True)
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - record it and go on with the next item
        call.fail(name, e)
    print(f"[vs] {name} took {time.perf_counter() - t0:.0f}s", flush=True)


def _peer_item(call: Call, part: str, done, to_rows) -> None:
    def run():
        rows = to_rows(run_peer(call, part, done))
        if not rows:
            raise RuntimeError(f"{PEER_SCRIPTS[part]} gave none of the cases needed "
                               f"(see peer_runs)")
        for row in rows:
            call.add(row)

    _item(call, f"{part}:mamba_ssm", run)


def main(argv=None) -> dict:
    """Measures every part that fits the budget; returns the results document (also written)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.path.exists(args.out):
        raise FileExistsError(f"{args.out} exists: a results file of record holds one call's rows "
                              "and is never merged into or overwritten; pick another --out")
    if not args.smoke:  # before the backend starts: the peer's processes need the rest
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_mem_fraction))
    import jax

    call = Call(args, argv)
    device = jax.devices()[0]
    if args.smoke and device.platform != "cpu":
        raise RuntimeError("--smoke is for CPU (run with JAX_PLATFORMS=cpu)")
    call.doc["device"] = getattr(device, "device_kind", "") or device.platform
    call.doc["jax"] = jax.__version__
    if args.compile_cache and not args.smoke:
        os.makedirs(args.compile_cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    call.write()
    print(f"[vs] call {call.doc['call_id']} on {call.doc['device']}, budget {args.budget_s:.0f}s",
          flush=True)

    from dimba_jax.models import flops as flops_lib

    peak = flops_lib.peak_flops_per_device(device)
    if not args.smoke:
        call.doc["peer_versions"] = peer_versions(args.peer_dir)
        call.write()
    need_ssd = lambda recs: set(SHAPE_NAMES) <= {r.get("name") for r in recs}  # noqa: E731
    need_train = lambda recs: any(r.get("model") == "130m" for r in recs)  # noqa: E731
    need_gen = lambda recs: any(_is_peer_decode_case(r) for r in recs)  # noqa: E731
    for part in args.parts:
        if part == "ssd":
            _item(call, "ssd:dimba_jax", our_ssd_rows, call)
            _peer_item(call, "ssd", need_ssd, lambda recs: peer_ssd_rows(recs, args.peer_ssd_time))
        elif part == "train_step":
            _peer_item(call, "train_step", need_train, lambda recs: peer_train_rows(recs, peak))
            _item(call, "train_step:dimba_base", our_train_row, call, "dimba_base",
                  args.dimba_config)
            gc.collect()
            _item(call, "train_step:ar_base", our_train_row, call, "ar_base", args.ar_config)
            gc.collect()
        else:
            _peer_item(call, "generate", need_gen, lambda recs: peer_generate_rows(recs))
            _item(call, "generate:dimba_base", our_generate_rows, call, "dimba_base")
            _item(call, "generate:ar_base", our_generate_rows, call, "ar_base")
    call.doc["finished_utc"] = utc_now()
    call.write()
    report.validate(call.doc)
    print(f"[vs] done in {call.doc['elapsed_s']:.0f}s: {len(call.doc['rows'])} rows, "
          f"{len(call.doc['skipped'])} skipped, {len(call.doc['failed'])} failed -> {args.out}",
          flush=True)
    return call.doc


if __name__ == "__main__":
    main()
