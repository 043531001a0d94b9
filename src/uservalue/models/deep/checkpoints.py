"""Training checkpoints of the deep models: run fingerprints, CPU weight copies, atomic save, load."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uservalue.io import atomic_path
from uservalue.models.deep.data import FeatureTensors

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(data: FeatureTensors, valid: np.ndarray) -> dict[str, Any]:
    return {
        "rows": len(data),
        "agg_shape": list(data.agg.shape),
        "sequence_shape": list(data.behavior.shape),
        "valid_rows": int(valid.sum()),
        "bought": float(data.bought.double().sum()),
        "value": round(float(data.value.double().sum()), 3),
    }


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state_dict on the CPU (unaffected by further training)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, expected: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it holds the run with fingerprint `expected`; any other file
    there is deleted."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file is not resumable
        log.warning("ignoring unreadable checkpoint %s: %s", path, error)
        path.unlink(missing_ok=True)
        return None
    if state.get("fingerprint") != expected:
        log.warning("ignoring checkpoint %s: it belongs to other params or data", path)
        path.unlink(missing_ok=True)
        return None
    return state
