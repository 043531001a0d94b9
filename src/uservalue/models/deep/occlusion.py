"""Token occlusion for the deep models' batches: `drop_tokens` re-packs a padded batch without some
tokens. Behaviour influence (effect and share) is no longer a deep-model notion: every model gets
it from uservalue.models.influence, read through predict_outputs (docs/models.md)."""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]


def drop_tokens(batch: Batch, keep: torch.Tensor) -> Batch:
    """The batch with only the tokens where `keep` is true, re-packed left-aligned."""
    valid = torch.arange(batch["behavior"].shape[1], device=keep.device)[None, :] < batch["lengths"][:, None]
    keep = keep & valid
    new_lengths = keep.sum(dim=1)
    column = torch.cumsum(keep.long(), dim=1) - 1
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    out = dict(batch)
    for name in ("behavior", "category", "item", "continuous"):
        source = batch[name]
        target = torch.zeros_like(source)
        target[rows[keep], column[keep]] = source[keep]
        out[name] = target
    out["lengths"] = new_lengths
    return out
