"""Config files and `--config.a.b=value` overrides (used by `dimba_jax.main`).

A config file is a Python file with `get_config()` returning a ConfigDict (see configs/).
Overrides are parsed against the type of the field they replace: bool ("true"/"false"/"1"/"0"),
int, float, str, or a Python literal for tuples ("(0.3, 0.5, 0.2)"). Unknown keys are an error
that names the nearest valid keys.
"""

from __future__ import annotations

import ast
import difflib

import ml_collections

from dimba_jax.config import load_config_file  # noqa: F401 - the CLI's config loader, re-exported


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` as a dotted path ("train.steps", ...)."""
    out = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += all_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def nearest_keys(config: ml_collections.ConfigDict, key: str, n: int = 3) -> list[str]:
    """The valid keys closest to `key` (difflib), also trying the last component alone."""
    keys = all_keys(config)
    near = difflib.get_close_matches(key, keys, n=n, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    for k in keys:
        if k.rsplit(".", 1)[-1] == leaf and k not in near:
            near.append(k)
    if not near:
        near = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=n)
        near = [k for k in keys if k.rsplit(".", 1)[-1] in near][:n]
    return near[:n]


def parse_value(text: str, current, key: str):
    """Parses `text` into the type of `current` (the field's present value).

    Raises:
      ValueError: the text does not parse as that type.
    """
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)  # tuples, lists, None
        return tuple(value) if isinstance(value, list) else value
    except (ValueError, SyntaxError):
        pass
    raise ValueError(f"--config.{key}={text!r}: expected {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]
                    ) -> ml_collections.ConfigDict:
    """Sets each (dotted key, text value) on `config` (in place; also returned).

    Raises:
      ValueError: an unknown key (message names the nearest valid keys) or a bad value.
    """
    valid = set(all_keys(config))
    for key, text in overrides:
        if key not in valid:
            near = nearest_keys(config, key)
            hint = f"; did you mean {' or '.join('--config.' + k for k in near)}?" if near else ""
            raise ValueError(f"unknown config key --config.{key}{hint}")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = parse_value(text, node[leaf], key)
    return config


def split_config_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=v` / `--config.a.b v` arguments from the others.

    Returns (other args, [(dotted key, text value), ...]) in the order given.
    Raises:
      ValueError: a `--config.x` without a value.
    """
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{arg} needs a value (--config.{body}=VALUE)")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
