"""Command line: flags -> config -> train / sample / eval. No logic lives here.

  python -m dimba_jax.main --config configs/tiny.py --workdir runs/tiny            # train
  python -m dimba_jax.main --workdir runs/tiny --mode sample --prompt "The sea" --steps 32 --sampler ddim
  python -m dimba_jax.main --workdir runs/tiny --mode sample                       # unprompted
  python -m dimba_jax.main --workdir runs/tiny --mode eval

Any config field can be overridden: --config.train.steps=1000 --config.model.d_model=256.
Exit codes: 0 done (also after a SIGTERM save), 2 bad input, 3 non-finite loss/gradient.
"""

from __future__ import annotations

import argparse
import logging
import sys

MODES = ("train", "sample", "eval", "export")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (`--config.a.b=value` overrides are split off before it runs)."""
    p = argparse.ArgumentParser(
        prog="python -m dimba_jax.main",
        description="Train DIMBA (or the AR baseline), sample from it, or evaluate it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "modes:\n"
            "  train   train --config in --workdir (resumes from the latest checkpoint there)\n"
            "  sample  load the latest checkpoint of --workdir; print each --prompt followed by\n"
            "          its continuation, or unconditional samples without --prompt\n"
            "  eval    load the latest checkpoint of --workdir; print the validation loss and the\n"
            "          head's token accuracy at several t\n"
            "  export  write the latest checkpoint of --workdir (EMA weights unless --no-ema) and its\n"
            "          config as one file, --out FILE.npz; sample/eval accept that file as --workdir\n\n"
            "config overrides:\n"
            "  --config.SECTION.FIELD=VALUE   any field of dimba_jax/config.py, e.g.\n"
            "                                 --config.train.steps=1000 --config.data.seq_len=256\n"
            "  (sample/eval start from WORKDIR/config.json, then apply the overrides)\n\n"
            "multi-process: launch/local.sh N ..., launch/slurm_gpu.sbatch, launch/tpu_pod.sh\n"
            "exit codes: 0 ok (also after a SIGTERM save), 2 bad input, 3 non-finite loss"))
    p.add_argument("--config", help="config file with get_config() (e.g. configs/tiny.py); "
                   "required for train")
    p.add_argument("--workdir", required=True,
                   help="run directory (checkpoints, metrics, samples); sample/eval: or an exported .npz")
    p.add_argument("--mode", choices=MODES, default="train", help="what to do (default: train)")
    p.add_argument("--prompt", action="append", default=None,
                   help="sample mode: a prompt to continue (repeat for several)")
    p.add_argument("--steps", type=int, default=None,
                   help="sample mode: reverse diffusion steps (default config.sample.steps)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="sample mode: sampler (default config.sample.sampler)")
    p.add_argument("--length", type=int, default=None,
                   help="sample mode: tokens to generate (default config.sample.length)")
    p.add_argument("--seed", type=int, default=0, help="sample mode: sampling seed")
    p.add_argument("--checkpoint-step", type=int, default=None,
                   help="sample/eval: use this checkpoint step instead of the latest")
    p.add_argument("--no-ema", action="store_true", help="sample/eval/export: raw weights, not the EMA")
    p.add_argument("--out", default="", help="export mode: the .npz file to write")
    p.add_argument("--export-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="export mode: dtype the floating weights are stored in")
    return p


def _setup_logging() -> None:
    import jax
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code."""
    from dimba_jax.train import overrides as ov

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        rest, pairs = ov.split_config_args(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    if args.steps is not None and args.steps <= 0:
        parser.error(f"--steps must be > 0, got {args.steps}")
    if args.length is not None and args.length <= 0:
        parser.error(f"--length must be > 0, got {args.length}")
    if args.mode == "export" and not args.out:
        parser.error("--mode export needs --out FILE.npz")
    if args.mode == "train" and not args.config:
        parser.error("--mode train needs --config (e.g. --config configs/tiny.py)")
    if args.mode != "sample" and (args.prompt or args.steps is not None or args.sampler
                                  or args.length is not None):
        parser.error("--prompt/--steps/--sampler/--length apply to --mode sample only "
                     "(training length: --config.train.steps)")

    try:
        if args.mode == "train":
            config = ov.apply_overrides(ov.load_config_file(args.config), pairs)
            from dimba_jax.train.distributed import initialize_distributed
            initialize_distributed(config.mesh)  # before any other jax call
            _setup_logging()
            from dimba_jax.train.loop import train_and_evaluate
            summary = train_and_evaluate(config, args.workdir)
            last = summary["last_metrics"]
            print(f"done: step {summary['step']}"
                  + (" (preempted; checkpoint saved)" if summary["preempted"] else "")
                  + (f", loss {last['loss']:.4f}" if "loss" in last else ""))
            return 0

        from dimba_jax.train import inference
        config = ov.apply_overrides(inference.load_config(args.workdir), pairs)
        _setup_logging()
        run = inference.load_run(args.workdir, args.checkpoint_step, not args.no_ema,
                                 config=config)
        if args.mode == "export":
            path = inference.export_run(run, args.out, args.export_dtype)
            print(f"exported step {run.step} ({'EMA' if run.uses_ema else 'raw'} weights, "
                  f"{args.export_dtype}) to {path}")
            return 0
        if args.mode == "sample":
            texts = inference.generate_text(run, args.prompt, steps=args.steps,
                                            sampler=args.sampler, length=args.length,
                                            seed=args.seed)
            prompts = args.prompt or [""] * len(texts)
            for i, (p, t) in enumerate(zip(prompts, texts)):
                print(f"--- sample {i} (step {run.step}) ---")
                print(p + t)
            return 0
        numbers = inference.evaluate_model(run)
        print(f"eval at step {run.step}:")
        for k in sorted(numbers):
            print(f"  {k:>14s} = {numbers[k]:.5g}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
