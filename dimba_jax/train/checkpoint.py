"""Checkpoints with orbax: asynchronous, keep-last-N, exact resume, resharding restore.

Layout of a workdir:
  config.json                     the settings the run trains with (rewritten when they change)
  checkpoints/<step>/params       parameters            (orbax StandardSave, sharded arrays)
  checkpoints/<step>/opt_state    optimizer state
  checkpoints/<step>/ema          EMA of the parameters (when train.ema_decay > 0)
  checkpoints/<step>/train        {"step", "rng"} arrays
  checkpoints/<step>/data/process_<i>-of-<n>.json   the data iterator state of every process
  checkpoints/<step>/meta         JSON: step, process count, wall time

Restoring passes target shardings, so a checkpoint written on 8 devices restores onto 4 (or
onto another mesh) by resharding. A checkpoint that fails to restore is reported, moved aside
to `checkpoints/<step>.corrupt` (never deleted) and the previous one is used. Saves that were
cut short never become visible (orbax writes to a temporary directory and renames at the end).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dimba_jax.config import default_config

_log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_directory(workdir: str) -> epath.Path:
    """`workdir/checkpoints` as an absolute path (orbax 0.12 refuses relative ones); cloud
    paths such as gs://bucket/run are kept as they are."""
    workdir = str(workdir)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / CHECKPOINT_DIR
# Config sections/keys that must match between a run and the checkpoints it resumes from.
_ARCHITECTURE_KEYS = ("task", "model", "data.tokenizer")


# ------------------------------------------------------------------ data-iterator state handler
class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves one JSON file per process: the data iterator state of that process.

    The state is captured by the caller at the step boundary (`IteratorStateSave(state)`), so
    the file matches the checkpointed step exactly. dict states are stored as JSON; bytes
    states (grain DataLoader) as base64.
    """

    def save(self, directory: epath.Path, args: "IteratorStateSave"):
        index, count = jax.process_index(), jax.process_count()
        state = args.state
        if isinstance(state, (bytes, bytearray)):
            payload = {"kind": "bytes", "state": base64.b64encode(bytes(state)).decode("ascii")}
        else:
            payload = {"kind": "json", "state": state}
        (directory / f"process_{index}-of-{count}.json").write_text(json.dumps(payload, indent=1))

    def restore(self, directory: epath.Path, args: "IteratorStateRestore" = None):
        """Returns this process's saved iterator state, or None if this process count has none."""
        index, count = jax.process_index(), jax.process_count()
        path = directory / f"process_{index}-of-{count}.json"
        if not path.exists():
            return None
        payload = json.loads(path.read_text())
        if payload["kind"] == "bytes":
            return base64.b64decode(payload["state"])
        return payload["state"]

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------ config.json
def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON-able dicts/lists."""
    return _plain(config)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _retuple(value, like):
    if isinstance(like, tuple) and isinstance(value, list):
        if like and all(isinstance(x, tuple) for x in like):
            return tuple(_retuple(v, like[0]) for v in value)
        return tuple(_retuple(v, None) if isinstance(v, list) else v for v in value)
    if like is None and isinstance(value, list):
        return tuple(_retuple(v, None) for v in value)
    return value


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """`default_config()` updated with `values` (a dict as written by `config_to_dict`).

    Keys unknown to the current defaults are ignored with a warning (an older run's config).
    """
    config = default_config()
    flat_defaults = _flatten(config_to_dict(config))
    for key, value in _flatten(values).items():
        if key not in flat_defaults:
            _log.warning("config.json key %s is not a config field any more; ignored", key)
            continue
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        current = node[leaf]
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        node[leaf] = _retuple(value, current)
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads `workdir/config.json` back into a full (locked) config.

    Raises:
      FileNotFoundError: the workdir or its config.json does not exist.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a dimba_jax training workdir")
    with open(path) as f:
        return config_from_dict(json.load(f))


def config_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Architecture keys (task, model.*, data.tokenizer) whose values differ from `saved`."""
    now = _flatten(config_to_dict(config))
    old = _flatten(saved)
    out = []
    for key in sorted(set(now) | set(old)):
        if any(key == k or key.startswith(k + ".") for k in _ARCHITECTURE_KEYS):
            if key in old and key in now and old[key] != now[key]:
                out.append(f"{key}: saved {old[key]!r}, now {now[key]!r}")
    return out


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds a finished checkpoint (a step directory)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a run of another architecture; reads only (writes nothing).

    Raises:
      ValueError: the workdir has a checkpoint and its config.json has a different architecture
        (task, model, tokenizer): those checkpoints could not be restored into this model.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not (os.path.exists(path) and has_checkpoint(workdir)):
        return  # nothing to resume: a leftover config.json is simply replaced
    with open(path) as f:
        saved = json.load(f)
    conflicts = config_conflicts(saved, config)
    if conflicts:
        raise ValueError(
            f"{workdir!r} holds a run with a different architecture; refusing to reuse it "
            f"(use another --workdir). Differences: {'; '.join(conflicts)}")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Makes `workdir/config.json` record `config`, the settings the run trains with.

    Call after `check_config`. A fresh workdir gets the file; on resume, settings that changed
    since the file was written are logged and written (the file always describes the run).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    now = _flatten(config_to_dict(config))
    if os.path.exists(path):
        with open(path) as f:
            old = _flatten(json.load(f))
        changed = [f"{k}: {v!r} -> {now.get(k)!r}" for k, v in old.items() if now.get(k, v) != v]
        if not changed:
            return
        _log.info("%s with changed settings (config.json updated): %s",
                  "resuming" if has_checkpoint(workdir) else "restarting", "; ".join(changed))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        os.replace(tmp, path)


# ------------------------------------------------------------------------------ the manager
@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""
    step: int
    state: Any            # TrainState with the target shardings
    data_state: Any       # this process's iterator state, or None
    meta: dict


class Checkpointer:
    """Saves and restores train states in `workdir/checkpoints` (all processes call every method)."""

    ITEMS = ("params", "opt_state", "ema", "train", "data", "meta")

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_directory(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(keep)), create=True,
            enable_async_checkpointing=bool(async_save))
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "ema": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": IteratorStateHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=self.ITEMS, item_handlers=handlers)
        self._report_unfinished()

    def _report_unfinished(self):
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for p in self.directory.iterdir():
            if "tmp" in p.name:
                _log.warning("ignoring unfinished checkpoint %s (a save was cut short)", p)

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, data_state: Any) -> None:
        """Starts an asynchronous save of `state` (a TrainState) at `step`.

        `data_state` is this process's data-iterator state captured at the same boundary.
        Returns once device data is copied out; `wait()` blocks until it is on disk.
        """
        if step in self.manager.all_steps():
            _log.info("checkpoint %d already exists; not overwriting it", step)
            return
        args = {
            "params": ocp.args.StandardSave(state.params),
            "opt_state": ocp.args.StandardSave(state.opt_state),
            "train": ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            "data": IteratorStateSave(data_state),
            "meta": ocp.args.JsonSave({"step": int(step), "process_count": jax.process_count(),
                                       "device_count": jax.device_count(),
                                       "time": time.time()}),
        }
        if state.ema is not None:
            args["ema"] = ocp.args.StandardSave(state.ema)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        """Blocks until every started save is finished and visible."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        """orbax/jax's multi-host preemption sync point (True on every process at once)."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # no distributed runtime / preemption service
            return False

    def _restore_step(self, step: int, abstract_state) -> Restored:
        args = {
            "params": ocp.args.StandardRestore(abstract_state.params),
            "opt_state": ocp.args.StandardRestore(abstract_state.opt_state),
            "train": ocp.args.StandardRestore({"step": abstract_state.step,
                                               "rng": abstract_state.rng}),
            "data": IteratorStateRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_state.ema is not None:
            args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        train = out["train"]
        ema = out["ema"] if abstract_state.ema is not None else None
        state = abstract_state.replace(step=train["step"], params=out["params"],
                                       opt_state=out["opt_state"], ema=ema, rng=train["rng"])
        if int(jax.device_get(state.step)) != step:
            raise ValueError(f"checkpoint {step} holds step {int(state.step)}")
        return Restored(step=step, state=state, data_state=out["data"], meta=out["meta"] or {})

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}.corrupt"
            n = 1
            while dst.exists():
                dst = self.directory / f"{step}.corrupt{n}"
                n += 1
            if src.exists():
                src.rename(dst)
                _log.warning("moved the unreadable checkpoint to %s", dst)
        _sync("dimba_quarantine_%d" % step)
        self.manager.reload()

    def restore(self, abstract_state) -> Restored | None:
        """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

        Args:
          abstract_state: TrainState of jax.ShapeDtypeStruct with `sharding` set (from
            `state.abstract_train_state`); a different mesh than the one that saved is fine.
        Returns:
          Restored, or None if there is no checkpoint.
        A checkpoint that fails to restore (torn, truncated, corrupt) is reported, moved to
        `<step>.corrupt`, and the previous one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                return self._restore_step(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                _log.error("checkpoint at step %d in %s is unreadable (%s: %s); falling back "
                           "to the previous one", step, self.directory, type(e).__name__,
                           str(e)[:500])
                self._quarantine(step)
        return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------ inference
@dataclasses.dataclass(frozen=True)
class LoadedParams:
    """What `load_params_for_inference` returns: params (nested dict of jax.Arrays), the
    checkpoint's step, and whether they are the EMA weights."""
    params: Any
    step: int
    uses_ema: bool


def load_params_for_inference(workdir: str, step: int | None = None, prefer_ema: bool = True,
                              abstract_params: Any = None) -> LoadedParams:
    """Loads the parameters (EMA when present and `prefer_ema`) of a training workdir.

    Read-only: nothing in the workdir is moved. With `step` None the newest checkpoint that
    restores is used; each newer one that fails to restore (torn, truncated, corrupt) is
    skipped with a one-line warning, as training resume does.

    Args:
      workdir: directory a training run wrote (holds checkpoints/).
      step: the checkpoint step; None = the newest readable one.
      prefer_ema: use the EMA weights if the checkpoint has them.
      abstract_params: optional nested dict of ShapeDtypeStructs (with shardings) giving the
        target structure; default = as saved, on one device (dict keys come back as strings).
    Raises:
      FileNotFoundError: no workdir, no checkpoints, the requested step does not exist, or no
        checkpoint (or not the requested one) is readable; the message is one line naming
        the workdir.
    """
    directory = checkpoint_directory(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    if not directory.exists():
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ (train first)")
    handlers = {"params": ocp.StandardCheckpointHandler(), "ema": ocp.StandardCheckpointHandler()}
    manager = ocp.CheckpointManager(directory, item_names=("params", "ema"),
                                    item_handlers=handlers,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{workdir!r} has no finished checkpoint (train first)")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{workdir!r} has no checkpoint at step {step} "
                                    f"(available: {steps})")
        candidates = [step] if step is not None else list(reversed(steps))
        failed = []  # (step, one-line reason), newest first
        for s in candidates:
            item = "ema" if prefer_ema and (directory / str(s) / "ema").exists() else "params"
            try:
                params = _restore_item(manager, s, item, abstract_params)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                failed.append((s, " ".join(f"{type(e).__name__}: {e}".split())[:200]))
                continue
            if failed:
                _log.warning("checkpoint %s of %s is unreadable (%s); using step %d",
                             ", ".join(str(f) for f, _ in failed), workdir, failed[0][1], s)
            return LoadedParams(params=params, step=int(s), uses_ema=item == "ema")
        if step is not None:
            raise FileNotFoundError(f"checkpoint {step} of {workdir!r} is unreadable "
                                    f"({failed[0][1]})")
        raise FileNotFoundError(f"{workdir!r} has no readable checkpoint (steps {steps} all fail "
                                f"to restore; newest error: {failed[0][1]})")
    finally:
        manager.close()


def _restore_item(manager, step: int, item: str, abstract_params: Any) -> Any:
    """Restores one item ("params" or "ema") of checkpoint `step` (as saved when abstract_params
    is None, on the first local device)."""
    if abstract_params is None:
        meta = manager.item_metadata(step)[item]
        tree = getattr(meta, "tree", meta)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=device),
            tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    out = manager.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract_params)}))
    return out[item]
