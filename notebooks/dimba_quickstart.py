"""Source of notebooks/dimba_quickstart.ipynb (percent format; `python notebooks/build_notebook.py`).

Runs top to bottom as a plain script too (that is how tests/test_notebook.py keeps it honest):

    python notebooks/dimba_quickstart.py

Environment variables (all optional):
    DIMBA_NOTEBOOK_STEPS    training steps (default: what configs/tiny.py says)
    DIMBA_NOTEBOOK_WORKDIR  where the run is written (default: runs/notebook_tiny)
    DIMBA_NOTEBOOK_SMOKE=1  shrink the model, batch and sample sizes for a seconds-long smoke test
"""

# %% [markdown]
# # DIMBA in JAX: train, sample, infill
#
# DIMBA writes a whole token sequence **in parallel**: it embeds tokens, adds Gaussian noise,
# and trains a bidirectional **Mamba-2** denoiser to recover the clean embeddings from the noisy
# ones, conditioned on a prompt and on the noise level. Sampling starts from pure noise and walks
# `T` denoising steps; a weight-tied head turns the result back into tokens.
# Fewer steps = faster, more steps = better.
#
# ![data flow](../docs/dataflow.png)
#
# This notebook trains the tiny configuration (a few minutes on a CPU runtime), plots its loss,
# samples with and without a prompt, fills in masked spans, and times the step count `T`.

# %% [markdown]
# ## 1. Install
#
# In Colab, uncomment the first two lines (replace `<REPO_URL>` with this repository's URL).
# On your own machine run `pip install -e ".[test]"` at the repository root instead and start
# Jupyter from there.

# %%
# !git clone <REPO_URL> dimba_jax
# %cd dimba_jax
# !pip install -q -e .

# %%
import json
import os
import pathlib
import time

import jax
import matplotlib.pyplot as plt

import dimba_jax
from dimba_jax.train.loop import train_and_evaluate
from dimba_jax.train.overrides import load_config_file

print("jax", jax.__version__, "devices:", jax.devices())


def find_repo_root() -> pathlib.Path:
    """The folder holding configs/tiny.py: the current folder or one of its parents."""
    here = pathlib.Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "configs" / "tiny.py").exists():
            return folder
    raise FileNotFoundError("configs/tiny.py not found: run this notebook from inside the dimba_jax repository")


REPO = find_repo_root()
SMOKE = os.environ.get("DIMBA_NOTEBOOK_SMOKE", "0") == "1"
WORKDIR = os.environ.get("DIMBA_NOTEBOOK_WORKDIR", str(REPO / "runs" / "notebook_tiny"))

# %% [markdown]
# ## 2. Train `configs/tiny.py`
#
# The config is an `ml_collections.ConfigDict`; every field is documented in
# `dimba_jax/config.py`. Change any field before training, exactly as `--config.a.b=value`
# does on the command line. Re-running this cell resumes from the last checkpoint in `WORKDIR`.

# %%
config = load_config_file(str(REPO / "configs" / "tiny.py"))
if "DIMBA_NOTEBOOK_STEPS" in os.environ:
    config.train.steps = int(os.environ["DIMBA_NOTEBOOK_STEPS"])
if SMOKE:  # seconds-long settings for the automated test; the real notebook leaves these alone
    config.model.d_model, config.model.n_layers, config.model.d_state = 32, 1, 8
    config.model.headdim, config.model.time_embed_dim = 16, 32
    config.model.ssd_impl = "reference"  # the sequential scan compiles fastest
    config.model.self_condition = False  # one denoiser pass per step: half the compile time
    config.data.seq_len, config.data.max_docs, config.train.batch_size = 48, 50, 4
    config.train.log_every = 1
    config.train.checkpoint_every = config.train.steps
    config.train.eval_batches = 1
    config.sample.num_samples = 1
    config.sample.length = 16
config.train.log_every = min(config.train.log_every, max(1, config.train.steps // 10))
print(config.model)

start = time.time()
train_and_evaluate(config, WORKDIR)
print(f"trained {config.train.steps} steps in {time.time() - start:.0f} s; run folder: {WORKDIR}")

# %% [markdown]
# ## 3. The loss curve
#
# The trainer appends one JSON object per logged step to `WORKDIR/metrics.jsonl`.

# %%
records = [json.loads(line) for line in open(os.path.join(WORKDIR, "metrics.jsonl")) if line.strip()]
train_records = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
loss_parts = [key for key in ("loss", "mse", "ce") if any(key in r for r in train_records)]
fig, ax = plt.subplots(figsize=(6, 3.5))
for key in loss_parts:
    points = [(r["step"], r[key]) for r in train_records if key in r]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=key)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_yscale("log")
ax.legend()
ax.set_title("DIMBA tiny: training loss")
plt.show()
print("last logged:", {k: round(train_records[-1][k], 4) for k in ("step", *loss_parts, "acc") if k in train_records[-1]})

# %% [markdown]
# ## 4. Load the trained model and sample
#
# `dimba_jax.load(workdir)` restores the latest checkpoint (EMA weights when the run kept them)
# and returns a `Pipeline` with `generate` and `infill`. Prompts of different lengths are batched
# together; `length` is the number of new tokens per prompt.

# %%
model = dimba_jax.load(WORKDIR)
print(model)
LENGTH = config.sample.length
STEPS = 8 if SMOKE else 32

unprompted = model.generate(["", ""], length=LENGTH, steps=STEPS, seed=0)
for i, text in enumerate(unprompted):
    print(f"--- unprompted sample {i}\n{text}")

prompts = ["The old man", "It was a dark and stormy night"]
for prompt, text in zip(prompts, model.generate(prompts, length=LENGTH, steps=STEPS, seed=1)):
    print(f"--- prompt {prompt!r}\n{prompt}{text}")

# %% [markdown]
# ## 5. Infilling
#
# Each mask token in the text marks a span to fill; `span_length` tokens are generated per mask
# (tokens of the run's tokenizer: BPE word pieces for configs/tiny.py, characters for a byte-level
# model). The text around the masks is kept exactly.

# %%
text = "The [MASK] was sitting by the [MASK] when the door opened."
print(model.infill(text, mask_token="[MASK]", span_length=3, steps=STEPS, seed=2))

# %% [markdown]
# ## 6. Speed vs quality: the number of steps `T`
#
# Every step is one forward pass of the denoiser over the whole sequence, so latency grows
# linearly with `T`. The first call at a given `T` compiles the sampler; we time a second call.

# %%
step_counts = (2, 8) if SMOKE else (4, 16, 64)
timings = {}
for steps in step_counts:
    model.generate("The", length=LENGTH, steps=steps, seed=0)  # compile
    start = time.perf_counter()
    sample = model.generate("The", length=LENGTH, steps=steps, seed=0)[0]
    timings[steps] = time.perf_counter() - start
    print(f"T={steps:3d}: {timings[steps] * 1000:7.1f} ms  {('The' + sample)!r}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(list(timings), [1000 * v for v in timings.values()], marker="o")
ax.set_xlabel("sampling steps T")
ax.set_ylabel("latency (ms, batch 1)")
ax.set_title(f"{LENGTH} new tokens on {jax.devices()[0].platform}")
plt.show()

# %% [markdown]
# ## Next
#
# * Train longer or larger: `python -m dimba_jax.main --config configs/small.py --workdir runs/small`
#   (see the README's configs table and `launch/` for multi-GPU / TPU).
# * Your own data: `--config.data.source="files:/path/*.jsonl"` or `"tfds:NAME"`.
# * Sampling knobs: `sampler="ddpm"`, `eta`, `guidance` (classifier-free), `clamp`.
