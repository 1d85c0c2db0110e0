"""dimba_jax.evaluate: testing the paper's claims (speed, quality, long context).

Modules, one job each:
  metrics       unigram entropy of sample sets (tokens and words; definitions in its docstring)
  judge         judge perplexity of texts under a causal LM (fixed windows), real-text reference
  timing        compile-excluded, synchronised, median-of-repeats timing; peak device memory
  generators    the AR baseline and DIMBA behind one `generate(spec, prompts, batch, seed)`
  harness       the speed/quality grid (T, sampler, length, prompted, variants) -> result rows
  long_context  denoiser step time and memory vs L, log-log slope
  results       the results-file schema, validation, atomic save and merging (resumable runs)
  plots         PNG figures and the Markdown table from a results file
  loading       fresh models (random weights) from a config, parameter counts
The GPU driver is `benchmarks/pareto.py`; the figures come from `benchmarks/plot_pareto.py`.
"""
