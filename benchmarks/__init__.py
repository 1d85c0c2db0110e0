"""Benchmark and report scripts, each run from the repository root as `python -m benchmarks.NAME`.

`device_tag` is the device part of the results' file names (`ssd_h200.json`, `ssd_h100.json`)."""

from __future__ import annotations

import re


def device_tag(device_kind: str) -> str:
    """The file-name tag of a `jax.Device.device_kind`: "h200" for an H200, "h100" for an H100,
    else the kind in lower case with every run of other characters as "_" ("cpu",
    "NVIDIA GH200 480GB" -> "nvidia_gh200_480gb"); "unknown" for an empty kind."""
    for model in ("H200", "H100"):
        if re.search(rf"\b{model}\b", device_kind, re.IGNORECASE):
            return model.lower()
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"
