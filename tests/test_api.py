"""The Python API (`dimba_jax.load` -> `Pipeline`): a real round trip on a micro run.

A micro DIMBA config is trained for two steps with `train_and_evaluate` (a checkpoint at each;
in a subprocess, see `workdir`),
then loaded back; generation is checked against the sampler called directly on a hand-built
[prompt | generation] batch (the independent reference for the batching of mixed-length prompts).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dimba_jax
from dimba_jax.config import default_config
from dimba_jax.diffusion import sampler as sampling
from dimba_jax.train.checkpoint import config_to_dict, load_params_for_inference


def micro_config():
    """A DIMBA config that compiles and trains in seconds on CPU (byte tokenizer, 1 block)."""
    c = default_config()
    c.model.d_model, c.model.n_layers, c.model.d_state = 32, 1, 8
    c.model.headdim, c.model.chunk_size, c.model.time_embed_dim = 16, 16, 32
    c.model.ssd_impl = "reference"
    c.model.self_condition = False
    c.diffusion.timesteps = 100
    c.data.seq_len, c.data.max_docs = 32, 20
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 2, 4, 1
    c.train.checkpoint_every, c.train.log_every, c.train.eval_batches = 1, 1, 1
    c.sample.length, c.sample.num_samples, c.sample.steps = 8, 1, 4
    return c


# Trains in a subprocess whose XLA compiles without LLVM optimisation (compilation dominates a
# two-step run; this halves it). No evaluation batches: the round trip needs checkpoints only.
_TRAIN = """
import json, sys
from dimba_jax.train.checkpoint import config_from_dict
from dimba_jax.train.loop import train_and_evaluate
summary = train_and_evaluate(config_from_dict(json.loads(sys.argv[1])), sys.argv[2],
                             eval_factory=lambda *args: [])
print("final step", summary["step"])
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api_run"))
    out = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(config_to_dict(micro_config())), path],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    assert "final step 2" in out.stdout
    return path


@pytest.fixture(scope="module")
def model(workdir):
    return dimba_jax.load(workdir)


def _embedding(pipeline):
    """The token-embedding matrix of the loaded model as numpy (vocab, d_model)."""
    return np.asarray(pipeline.model.embedding[...])


def _leaf_embedding(params):
    return np.asarray(params["embedding"])


def test_load_restores_latest_ema_and_given_step(workdir, model):
    assert model.step == 2 and model.uses_ema
    assert model.config.model.d_model == 32 and model.config.data.seq_len == 32
    loaded = load_params_for_inference(workdir, prefer_ema=True)
    ema, step = loaded.params, loaded.step
    raw = load_params_for_inference(workdir, prefer_ema=False).params
    assert step == 2 and loaded.uses_ema
    np.testing.assert_array_equal(_embedding(model), _leaf_embedding(ema))
    assert not np.array_equal(_leaf_embedding(ema), _leaf_embedding(raw))  # EMA really differs

    raw_model = dimba_jax.load(workdir, use_ema=False)
    assert not raw_model.uses_ema
    np.testing.assert_array_equal(_embedding(raw_model), _leaf_embedding(raw))
    first = dimba_jax.load(workdir, step=1)
    assert first.step == 1
    assert not np.array_equal(_embedding(first), _embedding(model))
    assert "step=2" in repr(model)


def test_generate_batches_mixed_length_prompts_like_the_sampler(model):
    prompts = ["", "ab", "The old man"]
    length, steps, seed = 6, 3, 7
    out = model.generate(prompts, length=length, steps=steps, seed=seed)
    assert isinstance(out, list) and len(out) == 3 and all(isinstance(s, str) for s in out)

    # Reference: one left-aligned batch [prompt | generation] with a per-example known mask.
    tok = model.tokenizer
    ids = [tok.encode(p) for p in prompts]
    total = max(map(len, ids)) + length
    tokens = np.zeros((3, total), np.int32)
    known = np.zeros((3, total), bool)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
        known[i, :len(row)] = True
    s = model.config.sample
    ref = np.asarray(sampling.sample(model.model, model.task.schedule, tokens, known, jax.random.key(seed),
                                     steps=steps, sampler="ddim", eta=float(s.eta), guidance=float(s.guidance),
                                     clamp=bool(s.clamp), temperature=float(s.temperature),
                                     grid=str(s.grid), score_temperature=float(s.score_temperature),
                                     score_temperature_final=float(s.score_temperature_final)))
    for i, row in enumerate(ids):
        np.testing.assert_array_equal(ref[i, :len(row)], row)  # prompts kept exactly
        expected = tok.decode(sampling.cut_at_eos(ref[i, len(row):len(row) + length], tok.eos_id))
        assert out[i] == expected

    # Deterministic given the seed; a single str is a batch of one.
    assert model.generate(prompts, length=length, steps=steps, seed=seed) == out
    # (shapes of the trainer's end-of-run sample: batch 1, config.sample.length/steps)
    single = model.generate("", seed=seed)
    assert isinstance(single, list) and len(single) == 1 and isinstance(single[0], str)


def test_infill_keeps_the_text_around_the_masks(model):
    text = "The [MASK] sat on the [MASK]."
    out = model.infill(text, span_length=4, steps=3, seed=1)
    assert out.startswith("The ") and out.endswith(".")
    middle = out[len("The "):-1]
    assert " sat on the " in middle
    # Each gap is at most span_length byte tokens (cut at EOS may shorten it): with 2 gaps the
    # filled text is at most 8 bytes longer than the known text (before any U+FFFD replacement).
    known = text.replace("[MASK]", "")
    assert len(out) <= len(known) + 8
    # Same seed, another mask marker: the same layout, so the same fill (and deterministic).
    assert model.infill(text.replace("[MASK]", "<gap>"), mask_token="<gap>", span_length=4, steps=3, seed=1) == out


def test_bad_arguments_raise_clear_errors(model):
    with pytest.raises(ValueError, match="sampler"):
        model.generate("hi", length=4, steps=2, sampler="euler")
    with pytest.raises(ValueError, match="context"):
        model.generate(["ok", "x" * 33], length=4, steps=2)  # seq_len is 32 byte tokens
    with pytest.raises(ValueError, match="steps"):
        model.generate("hi", length=4, steps=0)
    with pytest.raises(ValueError, match="steps"):
        model.generate("hi", length=4, steps=101)  # T = 100
    with pytest.raises(ValueError, match="length"):
        model.generate("hi", length=0, steps=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate([], length=4, steps=2)
    with pytest.raises(ValueError, match="mask token"):
        model.infill("no gaps here", steps=2)
    with pytest.raises(ValueError, match="span_length"):
        model.infill("a [MASK] b", span_length=0, steps=2)
    with pytest.raises(ValueError, match="context"):
        model.infill("y" * 40 + "[MASK]", span_length=2, steps=2)
    with pytest.raises(ValueError, match="sampler"):
        model.infill("a [MASK] b", span_length=2, steps=2, sampler="nope")


def test_missing_workdir_or_checkpoint_is_file_not_found(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dimba_jax.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        dimba_jax.load(str(tmp_path))  # a folder that is not a run
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), untrained / "config.json")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        dimba_jax.load(str(untrained))
    with pytest.raises(FileNotFoundError, match="step 99"):
        dimba_jax.load(workdir, step=99)


def test_load_rejects_a_non_dimba_run(workdir, tmp_path):
    other = tmp_path / "ar_run"
    other.mkdir()
    with open(os.path.join(workdir, "config.json")) as f:
        values = json.load(f)
    values["task"] = "ar"
    (other / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="DIMBA"):
        dimba_jax.load(str(other))


def test_import_dimba_jax_is_light():
    code = "import sys, dimba_jax; assert 'jax' not in sys.modules, 'jax imported'; print(callable(dimba_jax.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def _garble(step_dir):
    """Overwrites every file of a checkpoint's params and EMA with garbage (unreadable)."""
    for item in ("params", "ema"):
        for root, _, files in os.walk(os.path.join(step_dir, item)):
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"\x00garbage")


def test_unreadable_latest_checkpoint_falls_back_with_one_warning(workdir, tmp_path, caplog):
    from dimba_jax.train.inference import load_run

    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    _garble(os.path.join(copy, "checkpoints", "2"))
    caplog.set_level("WARNING")
    loaded = dimba_jax.load(copy)
    assert loaded.step == 1 and loaded.uses_ema
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name.startswith("dimba_jax")]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "using step 1" in warnings[0]
    np.testing.assert_array_equal(_embedding(loaded), _embedding(dimba_jax.load(workdir, step=1)))
    assert os.path.isdir(os.path.join(copy, "checkpoints", "2"))  # loading moves nothing
    with pytest.raises(FileNotFoundError, match="checkpoint 2 .* is unreadable"):
        load_run(copy, step=2)  # an explicitly asked step does not fall back


def test_no_readable_checkpoint_is_one_clear_line(workdir, tmp_path, capsys):
    from dimba_jax.main import main

    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    for step in ("1", "2"):
        _garble(os.path.join(copy, "checkpoints", step))
    with pytest.raises(FileNotFoundError, match="no readable checkpoint") as err:
        dimba_jax.load(copy)
    assert copy in str(err.value) and "\n" not in str(err.value)
    assert main(["--workdir", copy, "--mode", "sample"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and copy in lines[0]


def test_frozen_prompt_encoder_is_built_by_the_task_from_the_donor_run(workdir):
    from flax import nnx

    from dimba_jax.layers.conditioning import FrozenParam
    from dimba_jax.train.tasks import make_task

    config = micro_config()
    config.model.prompt_encoder = "frozen"
    config.model.prompt_encoder_checkpoint = workdir
    model = make_task(config).init_model(nnx.Rngs(0))
    donor = dimba_jax.load(workdir).model  # EMA weights, as the task reads them
    np.testing.assert_allclose(np.asarray(model.prompt_encoder.embedding[...]),
                               np.asarray(donor.embedding_table()), rtol=1e-6)
    assert isinstance(model.prompt_encoder.embedding, FrozenParam)
