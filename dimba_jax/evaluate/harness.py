"""The speed/quality harness: DIMBA at many step counts against the AR baseline.

For every run spec (model, sampler, steps, generation length L_gen, prompted or not, variant)
it generates, times and judges, and writes one row per batch size in the results schema of
`dimba_jax.evaluate.results`:

* **latency_ms**: median wall time (ms) of one generate call for the whole batch, device
  synchronised (`jax.block_until_ready`), compile excluded (one warm-up call), median of
  repeats. At batch 1 this is the latency per sequence. Host work inside the call (argument
  transfer, Python dispatch) is included; detokenising the result is not.
* **tokens_per_s**: batch * L_gen / latency (generated tokens only, prompts excluded).
* **judge_ppl, entropy**: from the samples of the largest batch of the spec (the same samples
  whose generation was timed): judge perplexity of the generated text (given its prompt when
  prompted) and the mean per-sample unigram entropy over judge tokens (see `metrics`). Text is
  cut at the first EOS before judging. Both are properties of the spec, not of the batch size,
  so every row of a spec carries the same quality numbers.
* **prompt fit** (prompted specs, in the row's "details"): `Judge.prompt_fit` of the judged
  samples: the judge perplexity of each continuation's first `fit_tokens` judge tokens after its
  own prompt and after another sample's prompt; own < other when the generator reads its prompt.
* **steps**: denoising steps for DIMBA; for the AR baseline the number of sequential network
  evaluations, i.e. L_gen.

Prompts are excerpts of `prompt_len` tokens cut from validation books (after skipping their
first `skip_tokens` tokens of licence text); unprompted AR samples start from EOS ("start of a
document"), unprompted DIMBA samples have no known positions. The reference row is the judge's
ppl and entropy of real validation text excerpts of L_gen judge tokens, as many as the largest
batch.

Every piece is resumable: after each spec the results file is rewritten (atomically), specs
whose rows already exist are skipped (unless `overwrite`), and a time budget stops the run
cleanly between specs. Results accumulate over several short GPU calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from dimba_jax.evaluate import judge as judge_lib
from dimba_jax.evaluate import results as results_lib
from dimba_jax.evaluate import timing

STEPS = (8, 16, 32, 64, 128, 256)
LENGTHS = (256, 1024)
SAMPLERS = ("ddim", "ddpm")
# Sampling variants (ablations), each a set of overrides of DimbaGenerator's options. "" is the
# model's default (its config.sample settings and self-conditioning when trained with it). Named
# here: the switches; numeric settings are PREFIX<number> (VARIANT_PATTERNS: "st0.7", "cfg2",
# "wf1"), and parts join with "+" ("wf1+st0.6"). wf1_st0.6 / wf3_st0.6 are the names the
# committed wavefront study recorded.
VARIANTS: dict[str, dict] = {
    "": {},
    "noclamp": {"clamp": False},
    "clamp": {"clamp": True},
    "noselfcond": {"self_condition": False},
    "uniform_grid": {"grid": "uniform"},
    "warp_grid": {"grid": "warp"},
    "random_order": {"wavefront_order": "random"},
    "draw": {"draw_x0": True},
    "wf1_st0.6": {"wavefront": 1.0, "score_temperature": 0.6},
    "wf3_st0.6": {"wavefront": 3.0, "score_temperature": 0.6},
}
VARIANT_PATTERNS = {"stf": "score_temperature_final", "st": "score_temperature", "wf": "wavefront",
                    "eta": "eta", "cfg": "guidance", "temp": "temperature",
                    "pwf": "prior_weight_final", "pw": "prior_weight", "mp": "score_min_p"}


def variant_options(name: str) -> dict:
    """The DimbaGenerator option overrides of a variant name: a key of VARIANTS, or parts joined
    by "+", each a key of VARIANTS or PREFIX<number> (VARIANT_PATTERNS). ValueError names an
    unknown part."""
    if name in VARIANTS:
        return dict(VARIANTS[name])
    out = {}
    for part in name.split("+"):
        if part in VARIANTS and part:
            out.update(VARIANTS[part])
            continue
        for prefix, option in VARIANT_PATTERNS.items():  # "stf" / "pwf" are tried before "st" / "pw"
            if part.startswith(prefix):
                try:
                    out[option] = float(part[len(prefix):])
                    break
                except ValueError:
                    pass
        else:
            raise ValueError(f"unknown sampling variant {part!r} in {name!r}: use a name of "
                             f"{sorted(k for k in VARIANTS if k)} or PREFIX<number> with PREFIX in "
                             f"{sorted(VARIANT_PATTERNS)}, parts joined by '+'")
    return out


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One generation setting to time and judge (at several batch sizes)."""

    model: str  # "dimba" | "ar"
    sampler: str  # "ddim" | "ddpm" | "ar"
    steps: int  # denoising steps (AR: = L_gen)
    L_gen: int  # generated tokens per sequence
    prompted: bool
    variant: str = ""  # a variant name (`variant_options`; "" = default settings)

    def row(self, batch: int, **values) -> dict:
        """A results row of this spec at `batch` (values: latency_ms, tokens_per_s, judge_ppl, entropy)."""
        row = {"model": self.model, "sampler": self.sampler, "steps": int(self.steps),
               "L_gen": int(self.L_gen), "batch": int(batch), "prompted": bool(self.prompted)}
        for k in ("latency_ms", "tokens_per_s", "judge_ppl", "entropy"):
            row[k] = values.get(k)
        if self.variant:
            row["variant"] = self.variant
        return row


class Generator(Protocol):
    """What the harness needs from a model: batched generation of token ids and decoding."""

    tokenizer: Any

    def generate(self, spec: RunSpec, prompts: np.ndarray | None, batch: int, seed: int
                 ) -> jax.Array:
        """Generates int32 (batch, spec.L_gen) ids (prompt excluded); prompts int32 (batch, P) or None."""
        ...


def plan(models: Sequence[str] = ("ar", "dimba"), samplers: Sequence[str] = SAMPLERS,
         steps: Sequence[int] = STEPS, lengths: Sequence[int] = LENGTHS,
         prompted: Sequence[bool] = (False, True), variants: Sequence[str] = ("",),
         headline_steps: int = 64) -> list[RunSpec]:
    """All specs of the selected grid, most important first.

    Order: unprompted before prompted, the longest length first, AR, then DIMBA DDIM at
    `headline_steps`, then the other step counts, DDPM after DDIM, ablation variants last (so a
    time-limited run measures the headline comparison first). Variants apply to DIMBA only;
    guidance variants ("cfg*") only to prompted specs.
    """
    for v in variants:
        variant_options(v)  # ValueError for an unknown one
    for m in models:
        if m not in ("ar", "dimba"):
            raise ValueError(f"unknown model {m!r}; expected 'ar' or 'dimba'")
    for s in samplers:
        if s not in SAMPLERS:
            raise ValueError(f"unknown sampler {s!r}; expected one of {SAMPLERS}")
    if any(int(t) < 1 for t in steps) or any(int(L) < 1 for L in lengths):
        raise ValueError("steps and lengths must be positive")
    specs = []
    for L in lengths:
        for p in prompted:
            if "ar" in models:
                specs.append(RunSpec("ar", "ar", int(L), int(L), bool(p)))
            if "dimba" in models:
                for s in samplers:
                    for t in steps:
                        for v in variants:
                            if v.startswith("cfg") and not p:
                                continue
                            specs.append(RunSpec("dimba", s, int(t), int(L), bool(p), v))
    max_len = max(int(L) for L in lengths)

    def priority(spec: RunSpec):
        return (spec.variant != "", spec.prompted, spec.L_gen != max_len, -spec.L_gen,
                spec.model != "ar", spec.sampler != "ddim", spec.steps != headline_steps,
                spec.steps, spec.variant)

    return sorted(dict.fromkeys(specs), key=priority)


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The ids before the first EOS (all of them if there is none)."""
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def decode_samples(ids: np.ndarray, tokenizer: Any) -> list[str]:
    """int (batch, L) generated ids -> list of strings, each cut at its first EOS."""
    eos = judge_lib.tokenizer_eos_id(tokenizer)
    return [tokenizer.decode(cut_at_eos(row, eos)) for row in np.asarray(ids)]


@dataclasses.dataclass
class HarnessOptions:
    """Knobs of `run_harness` (see its docstring)."""

    batches: Sequence[int] = (1, 64)
    repeats_small: int = 5  # timed repeats at batch 1
    repeats_large: int = 3  # timed repeats at the larger batches
    prompt_len: int = 64
    skip_tokens: int = 2000  # licence/front matter skipped at the start of each validation book
    seed: int = 0
    time_budget_s: float | None = None
    overwrite: bool = False
    samples_to_keep: int = 5  # sample texts stored per spec in results["samples"]
    fit_tokens: int = 32  # prompted rows: judge tokens of each continuation scored by `Judge.prompt_fit`


def _prompt_pool(val_texts: Sequence[str], tokenizer: Any, num: int, prompt_len: int,
                 skip_tokens: int) -> tuple[np.ndarray, list[str]]:
    """`num` prompts of `prompt_len` tokens from validation texts: (int32 (num, P), texts)."""
    try:
        chunks = judge_lib.real_token_chunks(val_texts, tokenizer, num, prompt_len, skip_tokens)
    except ValueError:  # short validation texts (smoke runs): do not skip front matter
        chunks = judge_lib.real_token_chunks(val_texts, tokenizer, num, prompt_len, 0)
    return np.asarray(chunks, np.int32), [tokenizer.decode(c) for c in chunks]


def ensure_reference(results: dict, judge: judge_lib.Judge, val_texts: Sequence[str],
                     length: int, num: int, skip_tokens: int, headline_length: int,
                     prompt_len: int = 0) -> None:
    """Computes the real-text reference at `length` judge tokens into results (if missing);
    with prompt_len > 0 also its "prompted" entry (`judge.reference_prompted_stats`, or
    {"error": ...} where the texts are too short)."""
    key = str(int(length))
    known = results.setdefault("reference_by_L", {}).get(key)
    if known is None or known.get("num") != num:  # (re)compute for this sample-set size
        try:
            stats = judge_lib.reference_stats(judge, val_texts, num, length, skip_tokens)
        except ValueError:
            stats = judge_lib.reference_stats(judge, val_texts, num, length, 0)
        results["reference_by_L"][key] = {"judge_ppl": stats["ppl"], "entropy": stats["entropy"],
                                          "entropy_words": stats["entropy_words"],
                                          "num": num, "length": length}
    entry = results["reference_by_L"][key]
    if prompt_len > 0 and entry.get("prompted", {}).get("prompt_len") != prompt_len:
        entry["prompted"] = {"error": "", "prompt_len": prompt_len}
        for skip in (skip_tokens, 0):
            try:
                entry["prompted"] = judge_lib.reference_prompted_stats(
                    judge, val_texts, num, prompt_len, length, skip)
                break
            except ValueError as e:
                entry["prompted"]["error"] = str(e)
    ref_key = str(int(headline_length)) if str(int(headline_length)) in results["reference_by_L"] \
        else max(results["reference_by_L"], key=int)
    ref = results["reference_by_L"][ref_key]
    results["reference"] = {"judge_ppl": ref["judge_ppl"], "entropy": ref["entropy"],
                            "L": int(ref_key)}


def run_harness(generators: dict[str, Generator], judge: judge_lib.Judge | None,
                specs: Sequence[RunSpec], val_texts: Sequence[str], results_path: str, *,
                options: HarnessOptions | None = None, command: str = "", device: str = "",
                log: Callable[[str], None] = print) -> dict:
    """Runs `specs` (skipping finished ones), merging rows into `results_path` after each.

    Args:
      generators: {"dimba": Generator, "ar": Generator} (only those the specs need).
      judge: the scorer; None leaves judge_ppl/entropy null (timing-only runs).
      specs: from `plan`, in the order to run.
      val_texts: validation documents (prompts and the reference are cut from them).
      results_path: JSON file to merge into (created if missing).
    Returns the results dict (also saved).
    """
    opts = options or HarnessOptions()
    batches = sorted({int(b) for b in opts.batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"batches must be positive ints, got {opts.batches}")
    missing = sorted({s.model for s in specs} - set(generators))
    if missing:
        raise ValueError(f"no generator for models {missing}")
    results = results_lib.load(results_path)
    results_lib.add_command(results, command, device)
    start = time.perf_counter()
    big = batches[-1]
    prompt_cache: dict[int, tuple[np.ndarray, list[str]]] = {}
    headline_len = max(s.L_gen for s in specs) if specs else 0
    done = {results_lib.row_key(r) for r in results["rows"]}
    for spec in specs:
        keys = [results_lib.row_key(spec.row(b)) for b in batches]
        if not opts.overwrite and all(k in done for k in keys):
            continue
        elapsed = time.perf_counter() - start
        if opts.time_budget_s is not None and elapsed > opts.time_budget_s:
            log(f"[harness] time budget {opts.time_budget_s:.0f}s spent; stopping before {spec}")
            break
        gen = generators[spec.model]
        if judge is not None:
            ensure_reference(results, judge, val_texts, spec.L_gen, big, opts.skip_tokens,
                             headline_len, opts.prompt_len if spec.prompted else 0)
        prompts, prompt_texts = None, None
        if spec.prompted:
            tok_id = id(gen.tokenizer)
            if tok_id not in prompt_cache:
                prompt_cache[tok_id] = _prompt_pool(val_texts, gen.tokenizer, big, opts.prompt_len,
                                                    opts.skip_tokens)
            prompts, prompt_texts = prompt_cache[tok_id]
        rows, detail = [], {}
        quality: dict = {}
        for b in reversed(batches):  # largest first: its samples are judged
            p = None if prompts is None else prompts[:b]
            t = timing.time_call(gen.generate, spec, p, b, opts.seed,
                                 repeats=opts.repeats_small if b == 1 else opts.repeats_large)
            ids = np.asarray(t.result)
            if ids.shape != (b, spec.L_gen):
                raise ValueError(f"{spec.model} generator returned shape {ids.shape}, "
                                 f"expected {(b, spec.L_gen)}")
            if b == big:
                texts = decode_samples(ids, gen.tokenizer)
                if judge is not None:
                    score = judge.score_texts(texts, None if prompt_texts is None
                                              else prompt_texts[:b])
                    quality = {"judge_ppl": score["ppl"], "entropy": score["entropy"]}
                    detail.update({"entropy_words": score["entropy_words"],
                                   "entropy_pooled": score["entropy_pooled"],
                                   "judge_tokens": score["tokens"],
                                   "mean_judge_tokens": score["mean_tokens"]})
                    if prompt_texts is not None and b > 1:
                        detail.update(judge.prompt_fit(texts, prompt_texts[:b], opts.fit_tokens))
                results.setdefault("samples", {})[results_lib.row_key(spec.row(0))] = [
                    ((prompt_texts[i] + " || ") if prompt_texts else "") + texts[i]
                    for i in range(min(opts.samples_to_keep, len(texts)))]
            row = spec.row(b, latency_ms=t.median_ms,
                           tokens_per_s=b * spec.L_gen / (t.median_ms / 1e3), **quality)
            rows.append(row)
            detail_b = dict(detail, compile_s=t.compile_s, times_ms=t.times_ms)
            results.setdefault("details", {})[results_lib.row_key(row)] = detail_b
        for row in rows:  # rows timed before the judged batch get its quality numbers
            row.update(quality)
        results_lib.merge_rows(results, sorted(rows, key=lambda r: r["batch"]))
        results_lib.save(results, results_path)
        done.update(keys)
        r1 = rows[-1]
        log(f"[harness] {spec.model:5s} {spec.sampler:4s} T={spec.steps:<4d} L={spec.L_gen:<5d} "
            f"prompted={int(spec.prompted)} {spec.variant or 'default':10s} "
            f"lat(b={r1['batch']})={r1['latency_ms']:.1f}ms "
            + (f"tps(b={rows[0]['batch']})={rows[0]['tokens_per_s']:.0f} " if len(rows) > 1 else "")
            + f"ppl={quality.get('judge_ppl', float('nan')):.2f} "
            f"H={quality.get('entropy', float('nan')):.3f} "
            f"[{time.perf_counter() - start:.0f}s]")
    return results
