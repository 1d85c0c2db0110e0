"""Tables, figures and samples from the quality study's results (runs anywhere, CPU is enough).

    python -m benchmarks.quality_report

Reads benchmarks/results/quality_{ablation,width,small}_h200.json, quality_small_{opt,post}_h100.json and, when present,
quality_{wavefront,ablation_pw,capacity}_h200.json and quality_tiny_{,sched_,sweep_,wavefront_,noise_,lr_,4x_,4x_seed1_,4x_seed2_,4x_minp_,4x_fit_,ctx_,vocab_,vocab_cfg_,input_,head_,ar_head_}cpu.json (written by
`benchmarks.quality_study`) and writes:
  benchmarks/results/quality_ablation_h200.md   one row per lever: bound, judged samples, context use
  benchmarks/results/quality_width_h200.md      the same for diffusion widths (model.embed_dim)
  benchmarks/results/quality_wavefront_h200.md  the same for the wavefront of noise levels
  benchmarks/results/quality_ablation_pw_h200.md  the default recipe at prior weights and score temperatures
  benchmarks/results/quality_capacity_h200.md   training levers at equal tokens (size, learning rate, steps)
  benchmarks/results/quality_tiny_cpu.md        configs/tiny.py on CPU: bound, sampling variants, samples
  benchmarks/results/quality_tiny_sched_cpu.md  the same models (exported) at score-temperature schedules
  benchmarks/results/quality_tiny_sweep_cpu.md  and a sampler sweep around the chosen schedule
  benchmarks/results/quality_tiny_wavefront_cpu.md  tiny trained and sampled with wavefronts in both orders
  benchmarks/results/quality_tiny_noise_cpu.md  tiny with the warp's floor raised (more levels off the band)
  benchmarks/results/quality_tiny_lr_cpu.md     tiny at learning rate 6e-3, and at twice the steps of half the batch
  benchmarks/results/quality_tiny_lr_b3_cpu.md  the same lever once more: 2720 steps of 3 windows
  benchmarks/results/quality_tiny_4x_cpu.md     tiny and its AR model on 4x the tokens, and prior weights
  benchmarks/results/quality_tiny_4x_seed{1,2}_cpu.md  the 4x model's key settings at two more sample seeds
  benchmarks/results/quality_tiny_4x_minp_cpu.md  the 4x model with the score's min-p truncation
  benchmarks/results/quality_tiny_4x_fit_cpu.md  the 4x models again, with the prompt fit of their prompted samples
  benchmarks/results/quality_tiny_ctx_cpu.md    tiny with prefix-heavy layouts and with the warp floor at 1: prompt fit, context by position
  benchmarks/results/quality_tiny_vocab_cpu.md  tiny with the 2048-id BPE at twice the steps (equal wall time), its own AR judge
  benchmarks/results/quality_tiny_input_cpu.md  tiny with the posterior input (model.posterior_input) beside the recipe
  benchmarks/results/quality_tiny_head_cpu.md   tiny with the head's GEMMs on bfloat16 operands (model.head_dtype) beside float32 and seed 1
  benchmarks/results/quality_tiny_ar_head_cpu.md  tiny's AR model likewise (its head's GEMMs, forward and backward)
  benchmarks/results/quality_posterior_h200.md  the posterior input at ablation scale, at three optimisations
  docs/posterior_tradeoff.png                   its runs' judge perplexity against sample entropy
  benchmarks/results/quality_posterior_{b8,lr}_h100.md  its best run at 9600 x 8 windows; at learning rates 6e-3 and 2e-3
  benchmarks/results/quality_prompt_{h100,h200}.md  the prompted target's levers at ablation scale, when present
  benchmarks/results/quality_prompt2_h100.md   the same study again, with the prompted real-text
                                                reference of quality_prompt_ar_h100.json (--runs ar)
  benchmarks/results/quality_tiny_input_s1_cpu.md  the same (recipe, posterior input, at equal time) at training seed 1
  benchmarks/results/quality_tiny_input_nograd_cpu.md  the posterior input without gradients through it, seed 1
  benchmarks/results/quality_tiny_4x_draw_cpu.md  the 4x model sampled toward drawn tokens (sample.draw_x0) instead of the mean
  benchmarks/results/quality_tiny_vocab_cfg_cpu.md  its v2k run prompted with classifier-free guidance and a low prior weight: prompt fit
  benchmarks/results/quality_small_post_h100.md  the model of record (posterior input, learning rate 4e-3):
                                                sampler sweep, rows, bound vs AR NLL
  benchmarks/results/quality_small_opt_h100.md  the same at small's earlier recipe (2e-3, no posterior input)
  benchmarks/results/quality_small_h200.md      and at the one before (learning rate 1e-3, 4000 x 16)
  benchmarks/results/quality_small_post_h200.md  the small_post study on an H200, when present
  docs/noise_curves.png                         head accuracy and cross-entropy against log-SNR
  docs/noise_curves_width.png                   the same for the diffusion widths
  docs/tiny_sampler_tradeoff.png                judge perplexity against entropy of tiny's samplers (1x, 4x tokens)
  docs/capacity_tradeoff.png                    the same for the capacity study's runs, one line per run
  docs/context_gain_tiny.png                    per noise level, what tiny has learned from context
                                                (likelihood_tiny_{input,vocab}_cpu.json, when they carry curves)
  docs/small_run/samples.txt                    samples of the model of record (T = 64 and 16,
                                                unprompted and prompted) and of the AR baseline
The Pareto file (`pareto_h200.json`) gets its table and plots from `benchmarks/plot_pareto.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os


CONTEXT_LEVELS = (-10.0, -8.0, -6.0, -4.0, -2.0, 0.0)
MIN_BOUND_LEVELS = 32  # as benchmarks.quality_study's: fewer strata, no quoted bound
RECORD = "quality_small_post_h100"  # the results of the model of record (configs/small.py's recipe)
# prompt studies whose prompted real-text reference comes from another call's results
PROMPT_CEILING = {"quality_prompt2_h100": "quality_prompt_ar_h100"}


def _f(v, spec=".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def real_prompted_sentence(res: dict, L: int) -> str:
    """" Real text after its own prompt: ..." from reference_by_L[L]["prompted"] (the
    prompted-over-unprompted ratio of the books' own continuations), or "" where not measured."""
    real = (res.get("reference_by_L") or {}).get(str(L), {}).get("prompted") or {}
    if "ratio" not in real:
        return ""
    return (f" Real text after its own {real['prompt_len']}-token prompt: judge ppl "
            f"{real['ppl_prompted']:.1f} against {real['ppl_unprompted']:.1f} without it "
            f"({real['ratio']:.2f}x), the ratio of continuations as good as the books' own.")


def real_text_ceiling(res: dict, other: dict, other_stem: str, L: int,
                      target: float = 0.8) -> str:
    """" Real text after its own prompt ..." from another call's results `other` (file
    `other_stem`.json) where `res` lacks reference_by_L[L]["prompted"]: that call's command, how
    closely the two calls' judges agree on the unprompted real-text reference (the relative
    difference of their judge ppl, rounded up to 0.1%), and the ratio against the prompted
    target; "" where neither holds the entry."""
    own = real_prompted_sentence(res, L)
    if own or not real_prompted_sentence(other, L):
        return own
    real = other["reference_by_L"][str(L)]["prompted"]
    ppl = res.get("reference_by_L", {}).get(str(L), {}).get("judge_ppl")
    ppl_other = other["reference_by_L"][str(L)].get("judge_ppl")
    agree = ""
    if ppl and ppl_other:
        diff = math.ceil(1000 * abs(ppl / ppl_other - 1.0)) / 10
        agree = (f"; its judge and this call's agree within {diff:.1f}% on the unprompted "
                 f"real-text reference (judge ppl {ppl_other:.2f} there, {ppl:.2f} here)")
    cmd = "; ".join(f"`{c}`" for c in other.get("commands", []))
    verdict = ("at or below" if real["ratio"] <= target else "above")
    return (f"{real_prompted_sentence(other, L)} This ratio comes from `{other_stem}.json`, "
            f"another call ({cmd}){agree}. It is the ceiling of the prompted target under this "
            f"judge: real text itself scores {real['ratio']:.2f}x, {verdict} the target's "
            f"{target:g}x.")


def _rows_by(res: dict, name: str) -> dict:
    """{prompted: row} of one run's judged rows (the largest batch)."""
    out = {}
    for r in res["rows"]:
        if r.get("variant", "") == name or (name in ("ar", "dimba") and r["model"] == name):
            if r["prompted"] not in out or r["batch"] > out[r["prompted"]]["batch"]:
                out[r["prompted"]] = r
    return out


def bound_cell(bound: dict) -> str:
    """The bound in bits per token, or why it is not quoted (an estimate from too few strata)."""
    levels = bound.get("levels")
    if levels is not None and levels < MIN_BOUND_LEVELS:
        return f"— ({levels} strata: too few for an estimate)"
    return _f(bound.get("bound_bits"), ".2f")


def context_cells(info: dict) -> str:
    c = info.get("context", {})
    return " ".join(f"{_f(c.get(f'acc_prompt_lam{lv:g}'), '.3f')}/{_f(c.get(f'acc_noprompt_lam{lv:g}'), '.3f')}"
                    for lv in CONTEXT_LEVELS)


def commands(res: dict) -> str:
    """The results' commands as an indented block, then their notes (how the calls went) if any."""
    text = "\n".join(f"    {c}" for c in res.get("commands", []))
    notes = res.get("notes") or ""
    notes = " ".join(notes) if isinstance(notes, list) else notes
    return text + (f"\n\n{notes}" if notes else "")


STUDY_TEXT = {
    "ablation": ("Quality ablation", "the paper's recipe, each lever alone, the combination without each part",
                 "with the run's own sampling settings (`paper*` runs clamp; score temperature 1)"),
    "width": ("Diffusion width (`model.embed_dim`)", "the default recipe at diffusion widths e = 256 "
              "(= d_model), 64, 32 and 16",
              "at score temperature 0.5 (the default; the judge ppl column), and unprompted at 0.7 and 1 "
              "(last column: judge ppl / entropy)"),
    "wavefront": ("Wavefront of noise levels (`diffusion.wavefront`, `sample.wavefront`)",
                  "the default recipe, the per-position level embedding alone (`pos`), and trained with "
                  "wavefronts of width up to 1 and 3 (half the examples; diffusion/wavefront.py)",
                  "at score temperature 0.8 (the default) and one level for all positions (the judge ppl "
                  "column), and unprompted at the variants of the last columns (judge ppl / entropy): "
                  "`st0.6` score temperature 0.6, `wfW` a wavefront of width W, `wfW_st0.6` both"),
    "ablation_pw": ("The output prior's weight at sampling (`sample.prior_weight`)",
                    "the default recipe (`all`)",
                    "at score temperature 0.8 (the default; the judge ppl column), and unprompted at the "
                    "variants of the last columns (judge ppl / entropy): `stX` score temperature X, "
                    "`stX+stfY` from X at the noisiest step to Y at the last, `pwX` the output prior at "
                    "weight X in the sampling logits"),
    "capacity": ("Training levers at equal tokens: model size, learning rate, optimizer steps",
                 "the default recipe (`all`, learning rate 2e-3) beside a wider denoiser (d_model 384, "
                 "12.0M parameters), a deeper one (12 blocks, 9.5M), a larger state (d_state 128, 6.3M), "
                 "learning rates 8e-3, 4e-3 and 1e-3, twice the optimizer steps at half the batch (2400 x 32 "
                 "windows: the same tokens), and the winners combined",
                 "at score temperature 0.8 (the default; the judge ppl column), and unprompted at the "
                 "variants of the last columns (judge ppl / entropy): `stX` score temperature X, "
                 "`stX+stfY` from X at the noisiest step to Y at the last, `pwX` the output prior at "
                 "weight X in the sampling logits"),
    "posterior": ("The posterior input (`model.posterior_input`)",
                  "the default recipe (`all`), the capacity study's best optimisation (learning rate "
                  "4e-3, 2400 x 32 windows) and the same at 4800 x 16 windows, each with and without the "
                  "stem reading every position's posterior mean under the output prior alone "
                  "(models/dimba.py); and the AR model trained at 4e-3 and 4800 x 16 (`ar+...`, the same "
                  "tokens: its NLL improves, its samples, judged by the default-recipe AR model, do not)",
                  "at score temperature 0.8 (the default; the judge ppl column), and unprompted at the "
                  "variants of the last columns (judge ppl / entropy): `stX` score temperature X, "
                  "`stX+stfY` from X at the noisiest step to Y at the last, `pwX` the output prior at "
                  "weight X in the sampling logits"),
    "posterior_b8": ("The posterior input at 9600 steps of 8 windows",
                     "the posterior study's best run (learning rate 4e-3, posterior input) trained once "
                     "more at twice the steps and half the batch: 9600 x 8 windows, the same tokens "
                     "(compare `lr4e-3+b16x4800+post` in quality_posterior_h200.md, another call)",
                  "at score temperature 0.8 (the default; the judge ppl column), and unprompted at the "
                  "variants of the last columns (judge ppl / entropy): `stX` score temperature X, "
                  "`stX+stfY` from X at the noisiest step to Y at the last, `pwX` the output prior at "
                  "weight X in the sampling logits"),
    "posterior_lr": ("The posterior input at learning rates 6e-3 and 2e-3",
                     "the posterior input at learning rate 6e-3 and 4800 x 16 windows (the study's "
                     "best run was 4e-3 there), and at 2e-3 (the small model's rate) and 9600 x 8 windows",
                  "at score temperature 0.8 (the default; the judge ppl column), and unprompted at the "
                  "variants of the last columns (judge ppl / entropy): `stX` score temperature X, "
                  "`stX+stfY` from X at the noisiest step to Y at the last, `pwX` the output prior at "
                  "weight X in the sampling logits"),
}


def best_within(res: dict, name: str, real_entropy: float | None) -> tuple[dict, str]:
    """(row, variant) of run `name`'s unprompted samples with the lowest judge perplexity among
    those whose entropy is within 5% of real text's ({} and "" if none is)."""
    from benchmarks.quality_study import ENTROPY_TOLERANCE

    best, label = {}, ""
    for r in res["rows"]:
        run, _, variant = r.get("variant", "").partition("/")
        if run != name or r["prompted"] or not r.get("judge_ppl") or not real_entropy:
            continue
        if abs(r["entropy"] / real_entropy - 1.0) <= ENTROPY_TOLERANCE and (
                not best or r["judge_ppl"] < best["judge_ppl"]):
            best, label = r, variant or "default"
    return best, label


def ablation_table(res: dict, study: str = "ablation", stem: str = "") -> str:
    """One row per run of a configs/ablation.py study (`stem`: its results file without .json,
    default quality_STUDY_h200)."""
    title, what, sampling = STUDY_TEXT[study]
    stem = stem or f"quality_{study}_h200"
    ref = res.get("reference", {})
    ar = res["runs"].get("ar", {})
    extra = sorted({r["variant"].split("/", 1)[1] for r in res["rows"] if "/" in r.get("variant", "")})
    lines = [f"# {title} — {res.get('device', '')}", "",
             f"Made by `benchmarks/quality_report.py` from `{stem}.json`, written by:", "",
             commands(res), "",
             f"`configs/ablation.py` (d_model 256, 6 bidirectional blocks, ~6.1M parameters), {what}; each run "
             "1200 steps x 64 x 256 = 19.7M tokens (or as its overrides say, at the same tokens), all trained "
             f"side by side on one GPU ({res.get('device', '')}); the AR model "
             "of the same size and tokens (9 causal blocks) is the scale and the judge (window 256). "
             f"Samples: DDIM T = 32, 256 tokens, 32 per row, {sampling}. Context: the head's accuracy "
             "on the 8 tokens after a clean 32-token prompt, prompt known / prompt noised like the rest, "
             f"at log-SNR {', '.join(f'{v:g}' for v in CONTEXT_LEVELS)} (at -10 those tokens carry no "
             "signal of their own: what is right there, the prompt told).", "",
             f"Real text (judge, L=256): judge ppl {_f(ref.get('judge_ppl'), '.1f')}, entropy "
             f"{_f(ref.get('entropy'), '.2f')} bits/token. AR: NLL {_f(ar.get('nll_bits'), '.2f')} bits/token, "
             f"next-token accuracy after the prompt {_f(ar.get('acc_after_prompt'), '.3f')}.", "",
             "| run | overrides of configs/ablation.py | bound bits/token | judge ppl (unprompted / prompted) "
             "| entropy | context acc with/without prompt |" + "".join(f" {v} |" for v in extra)
             + " best within 5% of real entropy (x AR) |",
             "|---|---|---|---|---|---|" + "---|" * len(extra) + "---|"]
    ar_ppl = _rows_by(res, "ar").get(False, {}).get("judge_ppl")
    for name, info in res["runs"].items():
        rows = _rows_by(res, name)
        bound = _f(info.get("bound", {}).get("bound_bits", info.get("nll_bits")), ".2f")
        if "unigram_bound" in info:
            free, own = info["unigram_bound"].get("bound_bits"), info.get("bound", {}).get("bound_bits")
            learned = f"; learned from context {free - own:.2f}" if free and own else ""
            bound += f" (context-free {_f(free, '.2f')}{learned})"
        over = ", ".join(f"{k}={v}" for k, v in info.get("overrides", {}).items()
                         if not k.startswith("@")) or "(defaults)"
        un, pr = rows.get(False, {}), rows.get(True, {})
        cells = ""
        for v in extra:
            r = _rows_by(res, f"{name}/{v}").get(False, {})
            cells += f" {_f(r.get('judge_ppl'), '.0f')} / {_f(r.get('entropy'), '.2f')} |"
        best, label = best_within(res, name, ref.get("entropy")) if info.get("task") == "dimba" else ({}, "")
        ratio = f", {best['judge_ppl'] / ar_ppl:.1f}x" if best and ar_ppl else ""
        cells += f" {_f(best.get('judge_ppl'), '.0f')} ({label}{ratio}) |" if best else " — |"
        lines.append(f"| {name} | {over} | {bound} | {_f(un.get('judge_ppl'), '.0f')} / "
                     f"{_f(pr.get('judge_ppl'), '.0f')} | {_f(un.get('entropy'), '.2f')} | {context_cells(info)} |"
                     + cells)
    return "\n".join(lines) + "\n"


def without_guidance(variant: str) -> str:
    """The sampling variant with its classifier-free guidance part removed ('pw0.6+cfg2' ->
    'pw0.6'): guidance acts only with a prompt, so this is the variant's unprompted twin."""
    return "+".join(p for p in variant.split("+") if p and not p.startswith("cfg"))


def prompt_table(res: dict, stem: str, ceiling: tuple[dict, str] | None = None) -> str:
    """The prompt study: per DIMBA run and prompted sampler, judge perplexity prompted against the
    same sampler unprompted (the prompted target's ratio), and the prompt fit; the AR model's
    ratio as the scale. `ceiling`: (results, stem) of another call holding the prompted
    real-text reference that `res` lacks (see real_text_ceiling)."""
    ref = res.get("reference", {})
    lines = [f"# The prompted target's levers at ablation scale — {res.get('device', '')}", "",
             f"Made by `benchmarks/quality_report.py` from `{stem}.json`, written by:", "",
             commands(res), "",
             "`configs/ablation.py` (d_model 256, 6 bidirectional blocks) with the posterior input at "
             "learning rate 4e-3, 4800 steps of 16 windows of 256 tokens (19.7M tokens), and the AR model "
             "of the same size and tokens (9 causal blocks), the judge (window 256); trained side by side "
             "in one call. Samples: DDIM T = 32, 256 tokens, 32 per row; prompted rows continue a 32-token "
             "prompt cut from a validation book and are judged conditioned on it. `ratio` is the prompted "
             "judge perplexity over the unprompted one at the same sampler without guidance (the issue's "
             "target: at most 0.8x); `prompt fit` the judge perplexity of the continuations' first tokens "
             "after their own prompt / after another sample's (below 1x: the continuation belongs to its "
             "prompt). `eta1`: DDIM at DDPM's variance (fresh noise at every step); `cfgG`: "
             "classifier-free guidance at scale G; `pwX` the output prior's weight.", "",
             f"Real text (judge, L=256): judge ppl {_f(ref.get('judge_ppl'), '.1f')}, entropy "
             f"{_f(ref.get('entropy'), '.2f')} bits/token."
             + (real_text_ceiling(res, *ceiling, 256) if ceiling
                else real_prompted_sentence(res, 256)),
             "",
             "| run | sampler | unprompted ppl / entropy | prompted ppl / entropy | ratio | prompt fit (own / other) |",
             "|---|---|---|---|---|---|"]
    for name, info in res["runs"].items():
        fits = {key.split("|")[-1]: fit for key, fit in info.get("prompt_fit", {}).items()}
        if info.get("task") == "ar":
            variants = [("", "ar", "ar")]
        else:
            variants = [(v, f"{name}/{v}" if v else name, f"{name}/{without_guidance(v)}" if v else name)
                        for v in [""] + sorted({r["variant"].split("/", 1)[1] for r in res["rows"]
                                                if r["prompted"] and r.get("variant", "").startswith(f"{name}/")})]
        for v, key_pr, key_un in variants:
            pr, un = _rows_by(res, key_pr).get(True, {}), _rows_by(res, key_un).get(False, {})
            ratio = (f"{pr['judge_ppl'] / un['judge_ppl']:.2f}x"
                     if pr.get("judge_ppl") and un.get("judge_ppl") else "—")
            fit = fits.get(v)
            fit_cell = (f"{_f(fit['fit_ppl_own'], '.0f')} / {_f(fit['fit_ppl_other'], '.0f')} "
                        f"({fit['fit_ppl_own'] / fit['fit_ppl_other']:.2f}x)" if fit else "—")
            lines.append(f"| {name} | {v or 'its default'} | {_f(un.get('judge_ppl'), '.0f')} / "
                         f"{_f(un.get('entropy'), '.2f')} | {_f(pr.get('judge_ppl'), '.0f')} / "
                         f"{_f(pr.get('entropy'), '.2f')} | {ratio} | {fit_cell} |")
    return "\n".join(lines) + "\n"


def tiny_table(res: dict, source: str = "quality_tiny_cpu.json") -> str:
    """A tiny study (CPU): bounds beside the AR NLL, then every sampling variant of each DIMBA run."""
    ref = res.get("reference", {})
    dimbas = {n: info for n, info in res["runs"].items() if info.get("task") == "dimba"}
    dimba, ar = next(iter(dimbas.values())), res["runs"].get("ar")
    ar_ppl = _rows_by(res, "ar").get(False, {}).get("judge_ppl")
    if ar is None:  # DIMBA measured from its export: the AR model is the judge alone
        ar = {"tokens_seen": dimba["tokens_seen"]}
    lines = [f"# configs/tiny.py and its AR model on CPU — {res.get('device', '')}", "",
             f"Made by `benchmarks/quality_report.py` from `{source}`, written by:", "",
             commands(res), "",
             f"DIMBA `configs/tiny.py` ({dimba['params']:,} parameters; runs: "
             + ", ".join(f"`{n}` ({', '.join(f'{k}={v}' for k, v in i.get('overrides', {}).items() if not k.startswith('@')) or 'as configured'})"
                         for n, i in dimbas.items())
             + f") and the AR model of the same width "
             f"(6 causal blocks, {format(ar['params'], ',') + ' parameters' if 'params' in ar else 'here the judge only, from its export'}), each trained on {dimba['tokens_seen']:,} tokens "
             f"({dimba['tokens_seen'] == ar['tokens_seen'] and 'equal' or 'UNEQUAL'}) of the embedded corpus, "
             "side by side (one process each); the AR model is the judge (window 64). Samples: DDIM "
             "T = 32, 64 tokens, 32 per row, unprompted unless said; `default` is configs/tiny.py's "
             "sampler when the run was measured (score temperature 1 until the tiny study chose 0.9 -> 0.5; "
             "pw0.6+st1+stf0.8 after these files were made). "
             "`stX` is a score temperature X at every step, `stX+stfY` one that goes linearly from X at the "
             "noisiest step to Y at the last, `wfW` a wavefront of width W (`+random_order`: in random order), "
             "`pwX` the output prior at weight X in the sampling logits (`sample.prior_weight`; 1 = as trained), "
             "`pwX+pwfY` that weight going linearly from X at the noisiest step to Y at the last, `draw` "
             "each step moving toward the embedding of a token drawn from the step's scores instead of their "
             "mean (`sample.draw_x0`; with `eta1`, DDIM at DDPM's variance: ancestral sampling).", "",
             f"Real text (judge, L=64): judge ppl {_f(ref.get('judge_ppl'), '.1f')}, entropy "
             f"{_f(ref.get('entropy'), '.2f')} bits/token. Bound (bits/token): "
             + ", ".join(f"{n} {bound_cell(i.get('bound', {}))}"
                         + (f" (context-free {bound_cell(i['unigram_bound'])})" if "unigram_bound" in i else "")
                         for n, i in dimbas.items())
             + f", against the AR model's NLL {_f(ar.get('nll_bits'), '.2f')}. Context use (head accuracy "
             "after a clean prompt at log-SNR -10, with / without it): "
             + ", ".join(f"{n} {_f(i.get('context', {}).get('acc_prompt_lam-10'), '.3f')} / "
                         f"{_f(i.get('context', {}).get('acc_noprompt_lam-10'), '.3f')}" for n, i in dimbas.items())
             + f"; AR next-token accuracy there {_f(ar.get('acc_after_prompt'), '.3f')}.", "",
             "| samples | judge ppl | x AR | entropy | entropy vs real |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        name = r.get("variant", "")
        run, _, v = name.partition("/")
        label = "AR" if r["model"] == "ar" else "DIMBA " + (f"{run} " if run != "dimba" else "") + (v or "default")
        label += " prompted" if r["prompted"] else ""
        ratio = r["judge_ppl"] / ar_ppl if ar_ppl and r.get("judge_ppl") else None
        rel = r["entropy"] / ref["entropy"] - 1 if ref.get("entropy") and r.get("entropy") else None
        lines.append(f"| {label} | {_f(r.get('judge_ppl'), '.0f')} | {_f(ratio, '.1f')} | "
                     f"{_f(r.get('entropy'), '.2f')} | {_f(rel and 100 * rel, '+.0f')}% |")
    if dimba.get("sweep"):
        lines += ["", "Sampler sweep (unprompted; the rows above use the setting with the lowest judge "
                  "perplexity among those with the entropy within 5% of real text's):", "",
                  "| sampler | variant | judge ppl | entropy | entropy vs real |", "|---|---|---|---|---|"]
        for r in dimba["sweep"]:
            rel = r["entropy"] / ref["entropy"] - 1 if ref.get("entropy") and r.get("entropy") else None
            lines.append(f"| {r['sampler']} | {r.get('variant') or 'default'} | {_f(r.get('judge_ppl'), '.0f')} | "
                         f"{_f(r.get('entropy'), '.2f')} | {_f(rel and 100 * rel, '+.0f')}% |")
    fit = prompt_fit_line(res)
    lines += (["", fit] if fit else [])
    for n, info in dimbas.items():
        first = first_position_line(info, ar or {})
        lines += ["", f"{n}: {first}"] if first else []
    lines += ["", "Samples (the first of each row):", ""]
    for key, texts in res.get("samples", {}).items():
        if texts:
            lines.append(f"* `{key}`: {texts[0][:300]!r}")
    return "\n".join(lines) + "\n"


def ar_runs_table(res: dict, source: str) -> str:
    """An AR-only study (CPU): held-out NLL, judged samples and their entropy for each AR run."""
    ref = res.get("reference", {})
    runs = res["runs"]
    judge = res.get("models", {}).get("judge", {})
    lines = [f"# AR runs of configs/tiny.py's width on CPU — {res.get('device', '')}", "",
             f"Made by `benchmarks/quality_report.py` from `{source}`, written by:", "",
             commands(res), "",
             "Each run trained on " + ", ".join(f"`{n}` {i['tokens_seen']:,}" for n, i in runs.items())
             + " tokens of the embedded corpus ("
             + ("equal" if len({i["tokens_seen"] for i in runs.values()}) == 1 else "UNEQUAL")
             + "), side by side (one process each); overrides: "
             + ", ".join(f"`{n}` ({', '.join(f'{k}={v}' for k, v in i.get('overrides', {}).items() if k not in ('task', 'model.bidirectional', 'model.n_layers')) or 'as configured'})"
                         for n, i in runs.items())
             + f". The judge is `{os.path.basename(judge.get('workdir', '')) or '?'}` (window "
             f"{judge.get('window', '?')}), so its own samples score best. Real text: judge ppl "
             f"{_f(ref.get('judge_ppl'), '.1f')}, entropy {_f(ref.get('entropy'), '.2f')} bits/token.", "",
             "| run | held-out NLL (bits/token) | judge ppl | prompted | entropy | prompted |",
             "|---|---|---|---|---|---|"]
    for name, info in runs.items():
        rows = {r["prompted"]: r for r in res["rows"] if r.get("variant") == name}
        un, pr = rows.get(False, {}), rows.get(True, {})
        lines.append(f"| {name} | {_f(info.get('nll_bits'), '.4f')} | {_f(un.get('judge_ppl'), '.0f')} | "
                     f"{_f(pr.get('judge_ppl'), '.0f')} | {_f(un.get('entropy'), '.2f')} | "
                     f"{_f(pr.get('entropy'), '.2f')} |")
    return "\n".join(lines) + "\n"


def small_table(res: dict, source: str, title: str) -> str:
    """The Markdown page of a small study: `title` heads it, `source` names its results file."""
    ref = res.get("reference", {})
    dimba, ar = res["runs"]["dimba"], res["runs"]["ar"]
    ar_ppl = next((r["judge_ppl"] for r in res["rows"] if r["model"] == "ar" and not r["prompted"]), None)
    lines = [f"# {title} — {res.get('device', '')}", "",
             f"Made by `benchmarks/quality_report.py` from `{source}`, written by:", "",
             commands(res), "",
             f"DIMBA `configs/small.py` ({dimba['params']:,} parameters) and AR `configs/ar_small.py` "
             f"({ar['params']:,}) each trained on {dimba['tokens_seen']:,} tokens "
             f"({dimba['tokens_seen'] == ar['tokens_seen'] and 'equal' or 'UNEQUAL'}); judge "
             f"`configs/judge.py` at 1500 steps, trained in the same call. "
             f"Real text (L=1024): judge ppl {_f(ref.get('judge_ppl'), '.1f')}, entropy "
             f"{_f(ref.get('entropy'), '.2f')} bits/token.{real_prompted_sentence(res, 1024)}", "",
             "## Likelihood on held-out text (same windows, bits per token)", "",
             "| model | bits/token | what |", "|---|---|---|",
             f"| DIMBA small | {_f(dimba['bound']['bound_bits'], '.2f')} | variational upper bound "
             f"(diffusion {_f(dimba['bound']['diffusion_bits'], '.2f')}, recon {_f(dimba['bound']['recon_bits'], '.2g')}, "
             f"prior {_f(dimba['bound']['prior_bits'], '.2g')}; stratified levels over log-SNR) |",
             *([f"| context-free denoiser | {bound_cell(dimba['unigram_bound'])} | the same bound of each "
                "position's exact posterior under the training tokens' unigram prior (no context), on "
                "DIMBA's embedding table |"] if "unigram_bound" in dimba else []),
             f"| AR small | {_f(ar['nll_bits'], '.2f')} | exact NLL |", "",
             "## Sampler sweep (T = 64, 1024 tokens, unprompted, 64 samples judged)", "",
             "The setting of record is the lowest judge perplexity among the settings whose sample "
             "entropy is within 5% of real text's (the lowest overall if none is).", "",
             "| sampler | variant (`stX` score temperature, `pwX` prior weight) | judge ppl | x AR | entropy | entropy vs real |",
             "|---|---|---|---|---|---|"]
    for s in dimba.get("sweep", []):
        ratio = s["judge_ppl"] / ar_ppl if ar_ppl and s.get("judge_ppl") else None
        rel = s["entropy"] / ref["entropy"] - 1 if ref.get("entropy") and s.get("entropy") else None
        lines.append(f"| {s['sampler']} | {s.get('variant') or 'default'} | {_f(s['judge_ppl'], '.1f')} | "
                     f"{_f(ratio, '.2f')} | {_f(s['entropy'], '.2f')} | "
                     f"{_f(None if rel is None else 100 * rel, '+.1f')}% |")
    chosen = next((r for r in res["rows"] if r["model"] == "dimba"), {})
    setting = f"{chosen.get('sampler', 'ddim').upper()}, {chosen.get('variant') or 'default'}"
    lines += ["", f"## Rows of record ({setting}; latency at batch 1, quality of 64 samples)", "",
              "| model | T | prompted | latency ms (b=1) | judge ppl | x AR | entropy | entropy vs real |",
              "|---|---|---|---|---|---|---|---|"]
    ar_rows = {r["prompted"]: r for r in res["rows"] if r["model"] == "ar" and r["batch"] == 1}
    for r in sorted(res["rows"], key=lambda r: (r["model"], r["prompted"], r["steps"])):
        if r["batch"] != 1:
            continue
        base = ar_rows.get(r["prompted"], {}).get("judge_ppl")
        ratio = r["judge_ppl"] / base if base and r["judge_ppl"] else None
        rel = r["entropy"] / ref["entropy"] - 1 if ref.get("entropy") and r.get("entropy") else None
        other = r["model"] == "dimba" and (r.get("variant") or "") != (chosen.get("variant") or "")
        steps = f"{r['steps']} ({r.get('variant') or 'default'})" if other else r["steps"]
        lines.append(f"| {r['model']} | {steps} | {'yes' if r['prompted'] else 'no'} | "
                     f"{_f(r['latency_ms'], '.1f')} | {_f(r['judge_ppl'], '.1f')} | {_f(ratio, '.2f')} | "
                     f"{_f(r['entropy'], '.2f')} | {_f(None if rel is None else 100 * rel, '+.0f')}% |")
    lines += ["", "## Context use (head accuracy on the 8 tokens after a clean 32-token prompt)", "",
              f"DIMBA with/without the prompt at log-SNR {', '.join(f'{v:g}' for v in CONTEXT_LEVELS)}: "
              f"{context_cells(dimba)}; the AR model's next-token accuracy at the same positions: "
              f"{_f(ar.get('acc_after_prompt'), '.3f')}.", ""]
    extra = [x for x in (first_position_line(dimba, ar), prompt_fit_line(res)) if x]
    return "\n".join(lines + [x for e in extra for x in (e, "")])


def prompt_fit_line(res: dict) -> str:
    """The prompt fit of every run's prompted rows (`Judge.prompt_fit`), when the results hold
    it: judge perplexity of the continuations' first tokens after their own prompt / another's."""
    cells = {}
    for name, info in res.get("runs", {}).items():
        for key, fit in info.get("prompt_fit", {}).items():
            model, sampler, steps, *_, variant = key.split("|")
            label = "AR" if model == "ar" else f"{name} T = {steps}" + (f" {variant}" if variant else "")
            cells[label] = (f"{label} {_f(fit['fit_ppl_own'], '.1f')} / {_f(fit['fit_ppl_other'], '.1f')} "
                            f"({_f(fit['fit_ppl_own'] / fit['fit_ppl_other'], '.2f')}x)")
            tokens = fit["fit_tokens"]
    if not cells:
        return ""
    return (f"Prompt fit: judge perplexity of the first {tokens} judge tokens of the prompted continuations "
            f"after their own prompt / after another sample's: {'; '.join(cells.values())}.")


def first_position_line(dimba: dict, ar: dict) -> str:
    """The context-use line of the first token after the prompt (the one the prompt decides most),
    when the results hold accuracies by position; '' otherwise."""
    per = dimba.get("context_by_position")
    if not per:
        return ""
    cells = ", ".join(f"{lam}: {_f(v['prompt'][0], '.3f')}/{_f(v['noprompt'][0], '.3f')}"
                      for lam, v in per.items() if float(lam) in CONTEXT_LEVELS)
    ar_first = (ar.get("acc_after_prompt_by_position") or [None])[0]
    return (f"The first token after the prompt alone, DIMBA with/without the prompt by log-SNR: {cells}; "
            f"the AR model's next-token accuracy there: {_f(ar_first, '.3f')}.")


def plot_noise_curves(studies: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, info in studies.items():
        nc = info.get("noise_curve")
        if not nc:
            continue
        lams = sorted({float(k.split("lam")[1]) for k in nc if k.startswith("acc_lam")})
        style = "-" if label.startswith("small") else ":"
        axes[0].plot(lams, [nc[f"acc_lam{v:g}"] for v in lams], style, marker=".", label=label)
        axes[1].plot(lams, [nc[f"ce_lam{v:g}"] for v in lams], style, marker=".", label=label)
    for ax, what in zip(axes, ("head token accuracy", "head cross-entropy (nats)")):
        ax.set_xlabel("log-SNR lambda per channel (noisier to the left)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Where the denoiser learns: validation windows, unconditional layout, by noise level")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_context_gain(docs: dict, path: str) -> str:
    """Per log-SNR, each DIMBA run's head cross-entropy beside the context-free posterior's (left)
    and their difference, what the run has learned from context (right), from likelihood files
    ({label: results of benchmarks.likelihood}) whose rows carry a "curve"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, doc in docs.items():
        ar = [r["bits"] for r in doc["rows"] if r["task"] == "ar"]
        for r in doc["rows"]:
            c = r.get("curve")
            if not c:
                continue
            name = f"{label}: {r['run']}"
            lam, ce, free = c["logsnr"], c["ce_bits"], c["context_free_ce_bits"]
            line, = axes[0].plot(lam, ce, marker=".", label=name)
            axes[0].plot(lam, free, ls=":", color=line.get_color())
            gain = r["context_free_bits"] - r["bits"]
            axes[1].plot(lam, [f - m for f, m in zip(free, ce)], marker=".", color=line.get_color(),
                         label=f"{name} ({gain:.2f} bits in the bound; AR {r['context_free_bits'] - ar[0]:.2f})"
                         if ar else name)
    axes[0].plot([], [], ls=":", color="grey", label="dotted: the context-free posterior")
    axes[0].set_ylabel("head cross-entropy (bits/token)")
    axes[1].set_ylabel("context-free minus the run's (bits/token)")
    axes[1].axhline(0.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xlabel("log-SNR lambda (noisier to the left)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("What the denoiser has learned from context, by noise level (validation windows, no prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish_tradeoff_axes(ax, ar_ppl: float | None, title: str, ncol: int = 1) -> None:
    """The AR model's perplexity line, log scale, labels, grid, legend and title of a judge
    perplexity-against-entropy panel."""
    if ar_ppl:
        ax.axhline(ar_ppl, color="k", ls=":", label=f"AR model's samples ({ar_ppl:.0f})")
    ax.set_yscale("log")
    ax.set_xlabel("sample entropy (bits/token: mean unigram entropy of each sample)")
    ax.set_ylabel("judge perplexity (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", ncol=ncol)
    ax.set_title(title, fontsize=9)


def plot_tradeoff(studies: dict, path: str) -> str:
    """Judge perplexity against sample entropy of every unprompted DIMBA row of tiny studies (one
    panel per {title: results}), score-temperature settings and prior-weight settings apart, with
    real text's entropy +-5% and the AR model's perplexity for scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 4.8), squeeze=False)
    for ax, (title, res) in zip(axes[0], studies.items()):
        ref = res.get("reference", {})
        ar_ppl = _rows_by(res, "ar").get(False, {}).get("judge_ppl")
        if ref.get("entropy"):
            ax.axvspan(0.95 * ref["entropy"], 1.05 * ref["entropy"], color="tab:green", alpha=0.12,
                       label="real text's entropy +-5%")
        groups = {"score temperature only": [], "with prior weight (pw)": []}
        for r in res["rows"]:
            if r["model"] != "dimba" or r["prompted"] or not r.get("judge_ppl"):
                continue
            v = r.get("variant", "").partition("/")[2] or "default"
            groups["with prior weight (pw)" if "pw" in v else "score temperature only"].append(
                (r["entropy"], r["judge_ppl"], v))
        for (label, pts), marker in zip(groups.items(), ("o", "s")):
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
                for x, y, v in pts:
                    ax.annotate(v, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        _finish_tradeoff_axes(ax, ar_ppl, title)
    fig.suptitle("DIMBA tiny samplers: judge perplexity against entropy (each panel has its own AR judge)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs_tradeoff(res: dict, path: str, title: str) -> str:
    """Judge perplexity against sample entropy of each DIMBA run's unprompted settings (one line per
    run, through its settings in entropy order), with real text's entropy +-5% and the AR model's
    perplexity for scale: the lower a run's line, the better its samples at any entropy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    ref = res.get("reference", {})
    if ref.get("entropy"):
        ax.axvspan(0.95 * ref["entropy"], 1.05 * ref["entropy"], color="tab:green", alpha=0.12,
                   label="real text's entropy +-5%")
    for name, info in res["runs"].items():
        if info.get("task") != "dimba":
            continue
        pts = sorted((r["entropy"], r["judge_ppl"]) for r in res["rows"]
                     if r.get("variant", "").partition("/")[0] == name and not r["prompted"]
                     and r.get("judge_ppl"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=name)
    _finish_tradeoff_axes(ax, _rows_by(res, "ar").get(False, {}).get("judge_ppl"), title, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_text(small: dict, source: str) -> str:
    """Every judged setting's samples of a small study, `source` naming its results file."""
    out = ["DIMBA small (the model of record) and the AR baseline: samples from benchmarks/quality_study.py",
           f"(its commands and device: benchmarks/results/{source}).",
           "Each block: the setting, then up to five samples of 1024 tokens; prompted samples show the",
           "64-token prompt (cut from a validation book), then ' || ', then the continuation.", ""]
    for key, texts in sorted(small.get("samples", {}).items()):
        out.append(f"=== {key} ===")
        for i, t in enumerate(texts):
            out.append(f"--- sample {i} ---")
            out.append(t.replace("\ufffd", "\ufffd"))
        out.append("")
    return "\n".join(out)


def render_if_present(results_dir: str, stem: str, table, written: list) -> dict | None:
    """Writes STEM.md from STEM.json with `table(results) -> str` when the JSON exists (its path is
    appended to `written`); returns the results, or None without the file."""
    src = os.path.join(results_dir, f"{stem}.json")
    if not os.path.isfile(src):
        return None
    with open(src) as f:
        res = json.load(f)
    path = os.path.join(results_dir, f"{stem}.md")
    with open(path, "w") as f:
        f.write(table(res))
    written.append(path)
    return res


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--docs", default="docs")
    args = p.parse_args(argv)
    written = []
    with open(os.path.join(args.results, "quality_ablation_h200.json")) as f:
        abl = json.load(f)
    with open(os.path.join(args.results, "quality_small_h200.json")) as f:
        small_v1 = json.load(f)
    with open(os.path.join(args.results, "quality_small_opt_h100.json")) as f:
        small_v2 = json.load(f)
    with open(os.path.join(args.results, f"{RECORD}.json")) as f:
        small = json.load(f)
    with open(os.path.join(args.results, "quality_width_h200.json")) as f:
        width = json.load(f)
    for name, text in (("quality_ablation_h200.md", ablation_table(abl)),
                       ("quality_width_h200.md", ablation_table(width, "width")),
                       ("quality_small_h200.md", small_table(
                           small_v1, "quality_small_h200.json", "DIMBA small at the earlier recipe (learning "
                           "rate 1e-3, 4000 steps of 16 windows) vs the AR baseline")),
                       ("quality_small_opt_h100.md", small_table(
                           small_v2, "quality_small_opt_h100.json", "DIMBA small at the earlier recipe "
                           "(learning rate 2e-3, 8000 steps of 8 windows, no posterior input) vs the AR baseline")),
                       (f"{RECORD}.md", small_table(
                           small, f"{RECORD}.json", "The model of record: DIMBA small (the posterior input, "
                           "learning rate 4e-3, 8000 steps of 8 windows) vs the AR baseline"))):
        path = os.path.join(args.results, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    render_if_present(args.results, "quality_small_post_h200", lambda res: small_table(
        res, "quality_small_post_h200.json", "DIMBA small at the recipe of record (posterior input, learning "
        "rate 4e-3, 8000 steps of 8 windows) vs the AR baseline, on an H200"), written)
    curves = {f"ablation: {k}": v for k, v in abl["runs"].items()}
    curves["small: dimba (model of record)"] = small["runs"]["dimba"]
    curves["small: dimba at 2e-3, no posterior input"] = small_v2["runs"]["dimba"]
    curves["small: dimba at the earlier recipe"] = small_v1["runs"]["dimba"]
    written.append(plot_noise_curves(curves, os.path.join(args.docs, "noise_curves.png")))
    widths = {f"width: {k}": v for k, v in width["runs"].items()}
    written.append(plot_noise_curves(widths, os.path.join(args.docs, "noise_curves_width.png")))
    tradeoff = {}
    for stem in ("quality_tiny_cpu", "quality_tiny_sched_cpu", "quality_tiny_sweep_cpu", "quality_tiny_wavefront_cpu",
                 "quality_tiny_noise_cpu", "quality_tiny_lr_cpu", "quality_tiny_4x_cpu", "quality_tiny_4x_seed1_cpu",
                 "quality_tiny_4x_seed2_cpu", "quality_tiny_4x_minp_cpu", "quality_tiny_4x_fit_cpu",
                 "quality_tiny_ctx_cpu", "quality_tiny_vocab_cpu", "quality_tiny_vocab_cfg_cpu",
                 "quality_tiny_input_cpu", "quality_tiny_input_s1_cpu", "quality_tiny_input_nograd_cpu",
                 "quality_tiny_4x_draw_cpu",
                 "quality_tiny_lr_b3_cpu", "quality_tiny_head_cpu"):
        tiny = render_if_present(args.results, stem, lambda res, stem=stem: tiny_table(res, f"{stem}.json"), written)
        if tiny is not None:
            if stem in ("quality_tiny_cpu", "quality_tiny_4x_cpu"):
                tradeoff[f"{tiny['runs']['dimba']['tokens_seen']:,} tokens ({stem}.json)"] = tiny
    if tradeoff:
        written.append(plot_tradeoff(tradeoff, os.path.join(args.docs, "tiny_sampler_tradeoff.png")))
    render_if_present(args.results, "quality_tiny_ar_head_cpu",
                      lambda res: ar_runs_table(res, "quality_tiny_ar_head_cpu.json"), written)
    for study, stem in (("wavefront", "quality_wavefront_h200"), ("ablation_pw", "quality_ablation_pw_h200"),
                        ("capacity", "quality_capacity_h200"), ("posterior", "quality_posterior_h100"),
                        ("posterior", "quality_posterior_h200"), ("posterior_b8", "quality_posterior_b8_h100"),
                        ("posterior_lr", "quality_posterior_lr_h100")):
        res = render_if_present(args.results, stem,
                                lambda res, study=study, stem=stem: ablation_table(res, study, stem), written)
        if res is not None and study == "capacity":
            written.append(plot_runs_tradeoff(
                res, os.path.join(args.docs, "capacity_tradeoff.png"),
                "configs/ablation.py, equal tokens (19.7M): training levers, each run at 4 sampler "
                "settings\n(quality_capacity_h200.json)"))
        if res is not None and stem == "quality_posterior_h200":
            written.append(plot_runs_tradeoff(
                res, os.path.join(args.docs, "posterior_tradeoff.png"),
                "configs/ablation.py, equal tokens (19.7M): the posterior input at three optimisations, "
                "each run at 3 sampler settings\n(quality_posterior_h200.json)"))
    for stem in ("quality_prompt_h100", "quality_prompt_h200", "quality_prompt2_h100"):
        other = PROMPT_CEILING.get(stem, "")
        src = os.path.join(args.results, f"{other}.json")
        ceiling = None
        if other and os.path.isfile(src):
            with open(src) as f:
                ceiling = (json.load(f), other)
        render_if_present(args.results, stem,
                          lambda res, stem=stem, c=ceiling: prompt_table(res, stem, c), written)
    gains = {}
    for stem, label in (("likelihood_tiny_input_cpu", "tiny (BPE-8k)"), ("likelihood_tiny_vocab_cpu", "tiny (BPE-2k)")):
        src = os.path.join(args.results, f"{stem}.json")
        if os.path.isfile(src):
            with open(src) as f:
                doc = json.load(f)
            if any("curve" in r for r in doc["rows"]):
                gains[label] = doc
    if gains:
        written.append(plot_context_gain(gains, os.path.join(args.docs, "context_gain_tiny.png")))
    path = os.path.join(args.docs, "small_run", "samples.txt")
    with open(path, "w") as f:
        f.write(samples_text(small, f"{RECORD}.json"))
    written.append(path)
    print("\n".join(written))
    return written


if __name__ == "__main__":
    main()
