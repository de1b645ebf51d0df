"""Figures measured once per machine and kept on disk, so that a plan does not change with load.

One JSON file per kind under ``$FXSKETCH_CACHE`` (default ``~/.cache/fxsketch``): ``device.json``
(roofline constants), ``workspace.json`` (kernel workspace), ``timing.json`` (node and op times).
A read-only or corrupt cache is not an error: the figure is measured again.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_path", "read", "update", "machine_key"]


def cache_path(name: str) -> Path:
    """``$FXSKETCH_CACHE/<name>.json``."""
    return Path(os.environ.get("FXSKETCH_CACHE", Path.home() / ".cache" / "fxsketch")) / f"{name}.json"


def read(name: str) -> dict[str, Any]:
    try:
        known = json.loads(cache_path(name).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def update(name: str, entries: dict[str, Any]) -> None:
    path = cache_path(name)
    try:
        known = read(name)
        known.update(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half
    except OSError:
        pass  # a read-only home: measured again next run


def machine_key(device: torch.device) -> str:
    """What a measured figure depends on besides its own signature: device, threads, torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    threads = torch.get_num_threads() if device.type == "cpu" else ""
    return f"{device.type}|{name}|{threads}|torch {torch.__version__}"
