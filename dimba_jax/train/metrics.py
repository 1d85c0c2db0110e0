"""Where training numbers and samples go: metrics.jsonl, TensorBoard, a progress bar, samples.txt.

Only process 0 writes; the other processes get no-op writers.
  workdir/metrics.jsonl   one JSON object per logged step: {"step": n, "split": "train"|"eval",
                          "loss": ..., <task loss parts>, "grad_norm", "lr", "tokens_per_s",
                          "step_time_s", "mfu" (when the device peak is known), "time": unix}
  workdir/tensorboard/    the same scalars (when tensorboardX is installed)
  workdir/samples.txt     sample text, appended at every sampling interval and at the end
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

_log = logging.getLogger(__name__)


def _json_number(v: Any):
    v = float(v)
    return v if math.isfinite(v) else str(v)


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional dependency
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                _log.info("tensorboardX not installed: writing metrics.jsonl only")

    def write(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
        """Appends one record {"step", "split", **scalars, "time"} and the TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _json_number(v) for k, v in scalars.items() if v is not None})
        record["time"] = time.time()
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(float(v)):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str, split: str | None = "train") -> list[dict]:
    """Reads workdir/metrics.jsonl back (records of one split, or all with split=None)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


class ProgressBar:
    """A tqdm bar over optimizer steps on process 0 (loss parts, tokens/s, ETA); silent elsewhere."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                                 dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in postfix.items()}, refresh=False)

    def write(self, text: str) -> None:
        """Prints a line above the bar (or plainly when there is no bar)."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def write_samples(workdir: str, step: int, samples: list[str], enabled: bool = True,
                  header: str = "") -> str:
    """Appends samples to workdir/samples.txt under a "=== step N ===" header; returns the text."""
    lines = [f"=== step {step} {header}".rstrip() + " ==="]
    for i, s in enumerate(samples):
        lines.append(f"--- sample {i} ---")
        lines.append(s)
    text = "\n".join(lines) + "\n"
    if enabled:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "samples.txt"), "a") as f:
            f.write(text)
    return text
