"""One-call GPU driver: (optionally train,) then time and judge DIMBA vs the AR baseline.

Writes (and merges into) the results JSON of `dimba_jax.evaluate.results` in its documented format
{"device", "command", "reference": {"judge_ppl", "entropy"}, "rows": [...], "long_context": [...]}
— after every measured spec, so a run cut short keeps everything it measured and the next run
continues where it stopped (finished specs are skipped). Make the plots and the Markdown table
afterwards on any machine with `python -m benchmarks.plot_pareto`.

Typical use on one H200 (the lead's single call; total wall time bounded by --budget-s):

    python -m benchmarks.pareto --train-seconds 100 \\
        --dimba runs/small --ar runs/ar_small --judge runs/judge \\
        --results benchmarks/results/pareto_h200.json --out $OUT/pareto_h200.json --budget-s 540

(the configs read the shared corpus from $DIMBA_DATA, default .gpu/data; --data-dir overrides)

Phases, in order, each within what is left of --budget-s:
 1. train (only with --train-seconds > 0): judge, AR baseline, DIMBA, each from its config
    (--judge-config configs/judge.py, --ar-config configs/ar_small.py, --dimba-config
    configs/small.py) into its workdir for about that many seconds; an existing workdir is
    resumed (its checkpoint continues), so repeated calls keep training the same models.
 2. load the three models from their workdirs (EMA weights when present).
 3. the headline specs: AR and DIMBA DDIM T=64 at the longest length, unprompted.
 4. the long-context study: one denoiser forward at batch 1 for L = 1k..64k, of the evaluated
    DIMBA model (or, with --long-context-config, of any config with random weights: timing does
    not depend on the weights); --long-context "" skips it.
 5. every other selected spec, most important first, until the budget is spent.
Subset flags (--models, --samplers, --steps, --lengths, --prompted, --variants, --batches)
select a part of the grid so results can accumulate over several short calls.

`--smoke` runs the whole pipeline on CPU in seconds: tiny random-weight models built from the
default config (byte tokenizer), tiny lengths and step counts, the embedded validation books.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import jax

from dimba_jax.config import load_config_file
from dimba_jax.evaluate import harness, judge as judge_lib, loading, long_context
from dimba_jax.train.inference import load_run
from dimba_jax.evaluate import results as results_lib
from dimba_jax.evaluate.generators import ArGenerator, DimbaGenerator


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _strs(text: str) -> list[str]:
    return [v.strip() for v in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dimba", default="runs/small", help="DIMBA training workdir")
    p.add_argument("--ar", default="runs/ar_small", help="AR baseline training workdir")
    p.add_argument("--judge", default="runs/judge", help="judge (AR LM) training workdir")
    p.add_argument("--dimba-config", default="configs/small.py")
    p.add_argument("--ar-config", default="configs/ar_small.py")
    p.add_argument("--judge-config", default="configs/judge.py")
    p.add_argument("--train-seconds", type=float, default=0.0,
                   help="train each model about this long first (resuming its workdir); 0 = no training")
    p.add_argument("--train-steps", type=int, default=0,
                   help="with --train-seconds: set train.steps of the DIMBA and AR configs to this (same "
                        "batch and seq_len, so the same tokens; the LR schedule completes); 0 = config's")
    p.add_argument("--judge-steps", type=int, default=0, help="likewise train.steps of the judge")
    p.add_argument("--eval-reserve-s", type=float, default=150.0,
                   help="never start a training phase that would leave less than this for evaluation")
    p.add_argument("--spec-reserve-s", type=float, default=40.0,
                   help="start no new spec when less than this is left of the budget (compile + timing)")
    p.add_argument("--data-dir", default="",
                   help="directory with train-*.jsonl.xz and validation.jsonl.xz (the shared corpus); "
                        "sets data.source/val_source of the trained configs and the validation books")
    p.add_argument("--token-cache", default="runs/token_cache",
                   help="data.token_cache_dir for the trained configs that leave it empty ('' = none)")
    p.add_argument("--val-source", default="",
                   help="validation books (open_source spec); default: --data-dir's validation file, "
                        "else the DIMBA config's data.val_source, else the embedded validation books")
    p.add_argument("--results", default="benchmarks/results/pareto_h200.json",
                   help="existing results to merge into (read if present)")
    p.add_argument("--out", default="", help="where to write the merged results (default: --results)")
    p.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole call")
    p.add_argument("--models", default="ar,dimba")
    p.add_argument("--samplers", default="ddim,ddpm")
    p.add_argument("--steps", default="8,16,32,64,128,256")
    p.add_argument("--lengths", default="1024,256")
    p.add_argument("--prompted", default="0,1", help="0 = unconditional, 1 = prompted")
    p.add_argument("--variants", default="", help="comma list of ablation variants: "
                   + ", ".join(k for k in harness.VARIANTS if k) + ", or PREFIX<number> with PREFIX in "
                   + ", ".join(harness.VARIANT_PATTERNS) + ", parts joined by '+' ('' = default settings)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats at batch 1 (3 at larger batches)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--judge-window", type=int, default=0,
                   help="judge scoring window in tokens (0 = the judge's training data.seq_len)")
    p.add_argument("--judge-stride", type=int, default=0,
                   help="judge window step (0 = half the window: every scored token after the first "
                        "window sees at least half a window of context)")
    p.add_argument("--judge-batch", type=int, default=16)
    p.add_argument("--no-ema", action="store_true", help="load raw parameters instead of the EMA")
    p.add_argument("--long-context", default="1024,4096,16384,65536",
                   help="lengths of the long-context study ('' = skip)")
    p.add_argument("--long-context-config", default="",
                   help="config file of the model whose denoiser the long-context study times, with "
                        "random weights (default: the evaluated DIMBA model itself)")
    p.add_argument("--overwrite", action="store_true", help="re-measure specs already in the results")
    p.add_argument("--allow-mixed", action="store_true",
                   help="keep rows measured with other checkpoints (default: drop them when the "
                        "workdir/step/size of a model changed)")
    p.add_argument("--compile-cache", default="runs/jax_cache",
                   help="persistent XLA compilation cache ('' = off); survives between calls on a warm machine")
    p.add_argument("--smoke", action="store_true", help="tiny random models on CPU (tests)")
    p.add_argument("--no-headline-first", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- configs
def smoke_config(task: str):
    """A tiny config for CPU smoke runs (byte tokenizer, one narrow layer)."""
    from dimba_jax.config import default_config

    c = default_config()
    c.task = task
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.d_state = 8
    c.model.headdim = 16
    c.model.chunk_size = 16
    c.model.time_embed_dim = 32
    c.model.ssd_impl = "xla"
    c.diffusion.timesteps = 100
    c.data.tokenizer = "byte"
    c.data.seq_len = 32
    return c


def _apply_data_dir(config, data_dir: str, token_cache: str) -> None:
    """Points the config at the shared corpus in `data_dir` and at a shared token cache."""
    if data_dir:
        config.data.source = f"files:{os.path.join(data_dir, 'train-*.jsonl.xz')}"
        config.data.val_source = f"files:{os.path.join(data_dir, 'validation.jsonl.xz')}"
    if token_cache and "token_cache_dir" in config.data and not config.data.token_cache_dir:
        config.data.token_cache_dir = token_cache  # the three models tokenize the corpus once


# ----------------------------------------------------------------------------- training
def train_for(config, workdir: str, seconds: float, log) -> dict:
    """Trains `config` into `workdir` for about `seconds` of wall time, resuming an existing run.

    The trainer stops cleanly on SIGTERM (finish the step, checkpoint, return), so a thread sends
    this process SIGTERM after `seconds` (and every 5 s until the trainer returns); the run keeps its config's step count and learning-rate
    schedule, and the next call resumes it from the checkpoint. A SIGTERM that arrives after the
    trainer returned is ignored here. Returns the trainer's summary.
    """
    import signal
    import threading

    from dimba_jax.train.loop import train_and_evaluate

    previous = signal.signal(signal.SIGTERM, lambda *_: log("[pareto] SIGTERM outside the training loop ignored"))
    done = threading.Event()

    def stopper():  # SIGTERM at the deadline, repeated until the trainer has returned (in case
        if done.wait(seconds):  # the first one came before its handler was installed)
            return
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            done.wait(5.0)

    log(f"[pareto] training {config.task} into {workdir} for <= {seconds:.0f}s "
        f"(config steps {int(config.train.steps)})")
    t0 = time.perf_counter()
    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    try:
        summary = train_and_evaluate(config, workdir)
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGTERM, previous)
    log(f"[pareto] {config.task} at step {summary.get('step')} after {time.perf_counter() - t0:.0f}s; "
        f"last metrics {summary.get('last_metrics')}")
    return summary


# ----------------------------------------------------------------------------- validation text
def validation_texts(args, dimba_config, limit_docs: int = 64, max_chars: int = 60_000) -> list[str]:
    """The validation books (documents as strings), each cut to its first `max_chars` characters.

    Prompts and reference excerpts are cut from these; 60k characters (~15k BPE tokens) per book
    leave ~12 non-overlapping 1024-token excerpts after the skipped front matter, and keep the
    tokenization of the books to a second or two.
    """
    from dimba_jax.data.sources import open_source

    spec = args.val_source
    if not spec and args.data_dir:
        spec = f"files:{os.path.join(args.data_dir, 'validation.jsonl.xz')}"
    if not spec and dimba_config is not None and dimba_config.data.val_source:
        spec = dimba_config.data.val_source
    if not spec:
        spec = "embedded"
    src = open_source(spec, split="validation" if spec == "embedded" else "all")
    return [src[i][:max_chars] for i in range(min(len(src), limit_docs))]


LONG_CONTEXT_DEFAULT = "1024,4096,16384,65536"


def run_long_context(args, cfg, model, weights: str, lengths, out_path: str, command: str,
                     device_name: str, deadline: float, log) -> None:
    """Denoiser forward time and memory at each length (skipping those already in the results).

    "peak_gib" is the step program's own footprint from XLA's buffer assignment (arguments +
    outputs + temporaries, per length; exact for what the step needs). The device's high-water
    mark ("device_peak_gib") is recorded beside it, but it counts everything the process did
    before (training, batch-64 generation), so it is only an upper bound.
    """
    res = results_lib.load(out_path)
    done = {r["L"] for r in res.get("long_context", [])}
    todo = [L for L in lengths if args.overwrite or L not in done]
    info = {"d_model": int(cfg.model.d_model), "n_layers": int(cfg.model.n_layers),
            "bidirectional": bool(cfg.model.bidirectional), "compute_dtype": str(cfg.model.compute_dtype),
            "ssd_impl": str(cfg.model.ssd_impl), "chunk_size": int(cfg.model.chunk_size),
            "params": loading.count_params(model), "weights": weights, "batch": 1,
            "step": "DimbaModel forward (self-conditioning input on, no clamp, no prompt)"}

    def save_row(row):
        row = dict(row, device_peak_gib=row["peak_gib"])
        if row.get("compiled_gib") is not None:
            row["peak_gib"] = row["compiled_gib"]
        r = results_lib.load(out_path)
        results_lib.merge_long_context(r, [row])
        r["long_context_slope"] = long_context.slope_of(r["long_context"])
        r["long_context_model"] = info
        results_lib.add_command(r, command, device_name)
        if command not in r.setdefault("long_context_commands", []):
            r["long_context_commands"].append(command)  # kept when stale rows are dropped
        results_lib.save(r, out_path)
        peak = row["peak_gib"]
        log(f"[pareto] long context L={row['L']}: {row['step_ms']:.3f} ms, "
            f"peak {'n/a' if peak is None else f'{peak:.3f}'} GiB")

    if todo:
        long_context.measure_scaling(long_context.dimba_forward_step_factory(model), todo,
                                     repeats=args.repeats,
                                     time_budget_s=max(0.0, deadline - time.perf_counter() - 10),
                                     on_result=save_row)


def _stale_models(old: dict, new: dict) -> list[str]:
    """Names of models whose checkpoint (workdir, step, size) differs between two "models" dicts."""
    keys = ("workdir", "step", "params")
    return [name for name in new if name in old
            and any(old[name].get(k) != new[name].get(k) for k in keys)]


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out_path = args.out or args.results
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.compile_cache and not args.smoke:
        try:  # a later call on the same (warm) machine reuses the compiled programs
            os.makedirs(args.compile_cache, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compile_cache))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
            log(f"[pareto] no persistent compilation cache: {e}")
    device = jax.devices()[0]
    device_name = f"{device.platform}:{getattr(device, 'device_kind', '')} x{jax.device_count()}"
    command = "python -m benchmarks.pareto " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    log(f"[pareto] device {device_name}; budget {args.budget_s:.0f}s")

    models_info, train_summaries = {}, {}
    if args.smoke:
        dimba_cfg, ar_cfg, judge_cfg = smoke_config("dimba"), smoke_config("ar"), smoke_config("ar")
        dimba_model, _, dimba_tok = loading.fresh_model(dimba_cfg, seed=0)
        ar_model, _, ar_tok = loading.fresh_model(ar_cfg, seed=1)
        judge_model, _, judge_tok = loading.fresh_model(judge_cfg, seed=2)
        for name, m in (("dimba", dimba_model), ("ar", ar_model), ("judge", judge_model)):
            models_info[name] = {"workdir": None, "step": 0, "params": loading.count_params(m),
                                 "note": "random weights (smoke)"}
    else:
        if args.train_seconds > 0:
            for name, cfg_path, workdir in (("judge", args.judge_config, args.judge),
                                            ("ar", args.ar_config, args.ar),
                                            ("dimba", args.dimba_config, args.dimba)):
                left = deadline - time.perf_counter()
                if left - args.train_seconds < args.eval_reserve_s:  # keep time for evaluation
                    log(f"[pareto] skipping training of {name}: only {left:.0f}s left")
                    continue
                cfg = load_config_file(cfg_path)
                _apply_data_dir(cfg, args.data_dir, args.token_cache)
                steps = args.judge_steps if name == "judge" else args.train_steps
                if steps > 0:
                    cfg.train.steps = steps
                    cfg.train.checkpoint_every = min(int(cfg.train.checkpoint_every) or steps, steps)
                    cfg.train.sample_every = 0  # samples and validation only at the end: time
                    cfg.train.eval_every = 0  # goes to training
                summary = train_for(cfg, workdir, args.train_seconds, log)
                train_summaries[name] = {"last_metrics": summary.get("last_metrics"),
                                         "eval": summary.get("eval"), "step": summary.get("step"),
                                         "start_step": summary.get("start_step"),
                                         "stopped_by_time": bool(summary.get("preempted")),
                                         "seconds": args.train_seconds}
        loaded = {}
        for name, workdir in (("dimba", args.dimba), ("ar", args.ar), ("judge", args.judge)):
            run = load_run(workdir, prefer_ema=not args.no_ema)
            model, cfg, tok, step = run.model, run.config, run.task.tokenizer, run.step
            loaded[name] = (model, cfg, tok)
            models_info[name] = {"workdir": workdir, "step": step, "params": loading.count_params(model),
                                 "d_model": int(cfg.model.d_model), "n_layers": int(cfg.model.n_layers),
                                 "seq_len": int(cfg.data.seq_len), "tokenizer": cfg.data.tokenizer,
                                 "tokens_seen": int(step) * int(cfg.train.batch_size) * int(cfg.data.seq_len)}
            if name in train_summaries:
                models_info[name]["last_training_call"] = train_summaries[name]
        (dimba_model, dimba_cfg, dimba_tok), (ar_model, ar_cfg, ar_tok), (judge_model, judge_cfg, judge_tok) = (
            loaded["dimba"], loaded["ar"], loaded["judge"])

    val_texts = validation_texts(args, None if args.smoke else dimba_cfg)
    judge_window = args.judge_window or int(judge_cfg.data.seq_len)
    judge_stride = args.judge_stride or max(1, judge_window // 2)
    judge = judge_lib.Judge(judge_model, judge_tok, window=judge_window, stride=judge_stride,
                            batch_size=args.judge_batch)
    res_models_extra = {"judge_window": judge_window, "judge_stride": judge_stride}
    generators = {"dimba": DimbaGenerator(dimba_model, dimba_cfg, dimba_tok),
                  "ar": ArGenerator.from_config(ar_model, ar_cfg, ar_tok)}

    variants = _strs(args.variants) if args.variants else [""]  # ",noclamp" = default + noclamp
    specs = harness.plan(models=_strs(args.models), samplers=_strs(args.samplers),
                         steps=_ints(args.steps), lengths=_ints(args.lengths),
                         prompted=[bool(int(v)) for v in _strs(args.prompted)], variants=variants)
    options = harness.HarnessOptions(batches=_ints(args.batches), repeats_small=args.repeats,
                                     repeats_large=max(1, min(3, args.repeats)),
                                     prompt_len=args.prompt_len, overwrite=args.overwrite)
    # start from the existing results (--results), write to --out
    if out_path != args.results and os.path.exists(args.results) and not os.path.exists(out_path):
        results_lib.save(results_lib.load(args.results), out_path)
    res = results_lib.load(out_path)
    stale = _stale_models(res.get("models") or {}, models_info)
    if stale and res["rows"] and not args.allow_mixed:
        log(f"[pareto] the results were measured with other checkpoints ({', '.join(stale)}): "
            f"dropping their {len(res['rows'])} rows and references (long-context timings kept)")
        for key in ("rows", "reference_by_L", "details", "samples"):
            res[key] = [] if key == "rows" else {}
        res["reference"] = {"judge_ppl": None, "entropy": None}
        res["commands"] = [c for c in res.get("commands", []) if c in res.get("long_context_commands", [])]
        res["command"] = " ; ".join(res["commands"])
    res.setdefault("models", {}).update(models_info)
    res["models"]["judge"].update(res_models_extra)
    results_lib.save(res, out_path)

    def run_specs(subset):  # no spec starts with less than --spec-reserve-s left
        options.time_budget_s = max(0.0, deadline - time.perf_counter() - args.spec_reserve_s)
        return harness.run_harness(generators, judge, subset, val_texts, out_path, options=options,
                                   command=command, device=device_name, log=log)

    headline = [s for s in specs if not s.prompted and not s.variant and s.L_gen == max(s.L_gen for s in specs)
                and (s.model == "ar" or (s.sampler == "ddim" and s.steps == 64))]
    if not args.no_headline_first and headline:
        run_specs(headline)

    lc_lengths = _ints(args.long_context) if args.long_context else []
    if args.smoke and args.long_context == LONG_CONTEXT_DEFAULT:
        lc_lengths = [64, 256]
    if lc_lengths and deadline - time.perf_counter() > 20:
        if args.long_context_config:
            lc_cfg = load_config_file(args.long_context_config)
            lc_model, _, _ = loading.fresh_model(lc_cfg, seed=0)
            weights = f"random ({args.long_context_config}; timing does not depend on weights)"
        else:
            lc_cfg, lc_model = dimba_cfg, dimba_model
            weights = "the evaluated DIMBA model" + (" (random, smoke)" if args.smoke else "")
        run_long_context(args, lc_cfg, lc_model, weights, lc_lengths, out_path, command, device_name,
                         deadline, log)
        del lc_model

    rest = [s for s in specs if s not in headline]
    if rest:
        run_specs(rest)
    res = results_lib.load(out_path)
    res["pre_split_fast_path"] = {name: bool(g.fast) for name, g in generators.items()}
    results_lib.save(res, out_path)
    results_lib.validate(res)
    log(f"[pareto] done in {time.perf_counter() - t_start:.0f}s: {len(res['rows'])} rows, "
        f"{len(res['long_context'])} long-context rows -> {out_path}")
    return res


if __name__ == "__main__":
    main()
