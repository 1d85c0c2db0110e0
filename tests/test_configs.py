"""The config files: each loads, and the AR baseline is DIMBA small's budget by construction."""

import pathlib

import pytest

from dimba_jax.config import sibling_config
from dimba_jax.train.overrides import load_config_file

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    c = load_config_file(str(path))
    assert c.task in ("dimba", "ar") and int(c.train.steps) > 0


def test_ar_small_sees_the_tokens_of_small():
    root = CONFIGS[0].parent
    small = load_config_file(str(root / "small.py"))
    ar = load_config_file(str(root / "ar_small.py"))
    assert (ar.task, small.task) == ("ar", "dimba") and not ar.model.bidirectional
    for section, keys in (("data", ("source", "val_source", "tokenizer", "seq_len")),
                          ("train", ("steps", "batch_size", "lr", "warmup_steps", "weight_decay"))):
        for k in keys:
            assert ar[section][k] == small[section][k], (section, k)
    assert ar.model.d_model == small.model.d_model


def test_sibling_config_names_a_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        sibling_config(str(CONFIGS[0]), "nope")
