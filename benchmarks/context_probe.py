"""Does the denoiser read its prompt? The head's accuracy position by position after a clean prompt.

    python -m benchmarks.context_probe --workdir runs/tiny --out runs/context_tiny.json

For each log-SNR level, the head's accuracy on each of the `--positions` tokens right after a
clean `--prompt-len`-token prefix of held-out windows, with the prefix known and with it noised
like the rest (`DimbaTask.context_use_by_position`). At a level where a position carries no
signal of its own, the gain is the prompt's alone; the first position is next-token prediction.

A control where context decides every token: `--make-successor DIR` writes train / validation
files of lines of successive letters ("m n o p q ...", random starts, wrapping at z); a model
trained on them must score near 1 with the prompt and near 1/26 without, at every level:

    python -m benchmarks.context_probe --make-successor runs/successor
    python -m dimba_jax.main --config configs/tiny.py --workdir runs/successor/w \\
        --config.data.source=files:runs/successor/train.jsonl \\
        --config.data.val_source=files:runs/successor/validation.jsonl \\
        --config.train.steps=300 --config.train.warmup_steps=40 --config.train.checkpoint_every=300
    python -m benchmarks.context_probe --workdir runs/successor/w --out runs/successor/probe.json

Writes the JSON (levels, per-position accuracies, the command, the device) and a Markdown table
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import string
import sys

LEVELS = (-15.0, -10.0, -8.0, -6.0, -4.0, -2.0)


def make_successor(folder: str, seed: int = 0, train_lines: int = 20000, val_lines: int = 500) -> list[str]:
    """Writes folder/{train,validation}.jsonl: one {"text": line} per line, each line 60-120
    successive lower-case letters separated by spaces from a random start. Returns the paths."""
    rnd = random.Random(seed)
    letters = string.ascii_lowercase
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, n in (("train", train_lines), ("validation", val_lines)):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w") as f:
            for _ in range(n):
                start, length = rnd.randrange(26), rnd.randint(60, 120)
                f.write(json.dumps({"text": " ".join(letters[(start + i) % 26] for i in range(length))}) + "\n")
        paths.append(path)
    return paths


def probe(workdir: str, prompt_len: int, positions: int, batches: int, batch_size: int) -> dict:
    """{level: {"prompt": [...], "noprompt": [...]}} averaged over `batches` validation batches."""
    from dimba_jax.data.pipeline import make_eval_batches
    from dimba_jax.train.inference import load_run
    run = load_run(workdir)
    if run.config.task != "dimba":
        raise SystemExit(f"{workdir}: a {run.config.task!r} run; the probe reads DIMBA denoisers")
    evals = make_eval_batches(run.config.data, run.task.tokenizer, batch_size, batches, int(run.config.data.seq_len))
    per = run.task.context_use_by_position(run.model, evals, prompt_len, positions, LEVELS)
    return {"step": run.step, "windows": batch_size * batches,
            "levels": {f"{lam:g}": {"prompt": w.tolist(), "noprompt": wo.tolist()} for lam, (w, wo) in per.items()}}


def table(res: dict) -> str:
    lines = [f"# Context probe — {res['device']}", "", "    " + res["command"], "",
             f"Run `{res['workdir']}` at step {res['step']}; {res['windows']} validation windows; head accuracy "
             f"on the {res['positions']} tokens after a clean {res['prompt_len']}-token prompt, "
             "with the prompt known / noised like the rest.", "",
             "| log-SNR | " + " | ".join(f"pos {i + 1}" for i in range(res["positions"])) + " |",
             "|---|" + "---|" * res["positions"]]
    for lam, acc in res["levels"].items():
        lines.append(f"| {lam} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(acc["prompt"], acc["noprompt"]))
                     + " |")
    return "\n".join(lines + ([ "", res["notes"]] if res.get("notes") else [])) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-successor", default="", help="write the successor-letter control data here and stop")
    p.add_argument("--workdir", default="", help="a DIMBA training workdir or one-file export")
    p.add_argument("--out", default="", help="results JSON (the Markdown table goes beside it)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--positions", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.make_successor:
        print("\n".join(make_successor(args.make_successor)))
        return {}
    if not args.workdir or not args.out:
        raise SystemExit("context_probe: give --workdir and --out (or --make-successor DIR)")
    import jax
    res = probe(args.workdir, args.prompt_len, args.positions, args.batches, args.batch_size)
    res.update(workdir=args.workdir, prompt_len=args.prompt_len, positions=args.positions,
               device=f"{jax.default_backend()}:{jax.devices()[0].device_kind}",
               command="python -m benchmarks.context_probe " + " ".join(
                   shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(table(res))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
