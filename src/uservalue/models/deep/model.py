"""`TorchValueModel`, the ValueModel both deep models derive from (a subclass builds the network),
and `TorchParams`, the knobs every deep model's training shares."""

from __future__ import annotations

import json
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from uservalue.features.online import FeatureArrays
from uservalue.features.sql import FeatureSpec
from uservalue.models.base import (
    FitContext,
    ModelParams,
    ValueModel,
    exposure_days,
    validation_mask,
)
from uservalue.models.deep import ziln
from uservalue.models.deep.checkpoints import cpu_state, data_fingerprint, fingerprint
from uservalue.models.deep.data import (
    AggregateStats,
    FeatureTensors,
    TokenStats,
    as_batch,
    batch_arrays,
    build_tensors,
    map_batches,
)
from uservalue.models.deep.layers import HashedEmbedding, rows_per_id
from uservalue.models.deep.loop import train_network
from uservalue.models.deep.runtime import resolve_device, seed_everything

WEIGHTS_FILE = "weights.pt"
FIT_SUMMARY_FILE = "fit_summary.json"


class TorchParams(ModelParams):
    """What every deep model's training needs (each model sets its own defaults)."""

    tower: int = Field(64, ge=1, description="width of the aggregate tower")
    text_tower: int = Field(16, ge=0, description="width of the pooled item-text tower next to the aggregate "
                                                  "tower (issue 23; 0: the text columns join the aggregate tower)")
    dropout: float = Field(0.1, ge=0, lt=1)
    id_dropout: float = Field(0.5, ge=0, lt=1, description="training: share of the model's ids (user, category, item) hidden")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(3, ge=1, description="epochs without a better validation loss before stopping")
    grad_clip: float = Field(5.0, gt=0)
    predict_batch_size: int = Field(8192, ge=1)
    min_id_rows: int = Field(20, ge=1, description="category/item ids held by fewer training rows are unknown (0)")
    bucket_by_length: bool = Field(
        False, description="training batches of similar sequence length: faster on skewed lengths, "
                           "but the batches are no longer i.i.d. (noisier calibration)")


class TorchValueModel(ValueModel):
    """fit / predict / save / load for a network built by the subclass; behaviour influence is the
    models.influence definition every model shares, read through predict_outputs."""

    Params = TorchParams
    # predict_arrays on the CPU runs the network traced by TorchScript: on a request's few rows the
    # eager nn.Module calls cost more than their arithmetic (the MLP: 0.27 ms eager, 0.16 ms traced,
    # the same bits). Only a network whose forward has no data-dependent Python branch can be
    # traced; a subclass opts in, and the trace is checked against eager before it is used.
    traced_inference: ClassVar[bool] = False

    def __init__(self, params: ModelParams, spec: FeatureSpec, horizon_days: int) -> None:
        super().__init__(params, spec, horizon_days)
        self.network: nn.Module | None = None
        self.device = torch.device("cpu")
        self.fit_summary: dict[str, Any] = {}
        # (the network traced, its serving forward, whether that is the trace): see _serving_forward.
        self._traced: tuple[nn.Module, Callable[[dict[str, torch.Tensor]], torch.Tensor], bool] | None = None

    # -- what a subclass provides ---------------------------------------------------------------
    @abstractmethod
    def build_network(self, agg_stats: AggregateStats, token_stats: TokenStats,
                      bias: tuple[float, ...]) -> nn.Module:
        """A fresh network (its forward(batch) returns ZILN outputs [B, 3]; it has `.head`)."""

    @property
    def user_buckets(self) -> int:
        return 1

    # -- data -----------------------------------------------------------------------------------
    def tensors(self, frame: pd.DataFrame, *, labels: bool) -> FeatureTensors:
        return build_tensors(frame, self.feature_columns, self.spec.sequence_length, self.horizon_days,
                             user_buckets=self.user_buckets, labels=labels)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, Any]:
        params: TorchParams = self.params  # type: ignore[assignment]
        device = resolve_device(ctx.device)
        data = self.tensors(train, labels=True)
        agg_stats = AggregateStats.fit(data.agg.numpy().astype(np.float64), self.feature_columns)
        token_stats = TokenStats.fit(data.continuous.numpy(), data.lengths.numpy())
        bias = ziln.initial_bias(data.bought.numpy(), data.value.numpy(), exposure_days(train, self.horizon_days),
                                 self.horizon_days)
        valid = validation_mask(train["user_id"], ctx.valid_fraction, ctx.seed)
        seed_everything(ctx.seed)
        net = self.build_network(agg_stats, token_stats, bias)
        for name, buckets in (("category", self.spec.category_buckets), ("item", self.spec.item_buckets)):
            table = getattr(net, name, None)
            if isinstance(table, HashedEmbedding):
                table.set_vocabulary(rows_per_id(getattr(data, name), data.lengths, buckets), params.min_id_rows)
        # train.<model>.distributed (the train stage puts it in ctx.extra): processes under torchrun
        nproc = int(ctx.extra.get("nproc_per_node", 1))
        run_fingerprint = fingerprint({
            "model": self.name, "params": params.model_dump(mode="json"), "spec": self.spec.__dict__,
            "horizon_days": self.horizon_days, "seed": ctx.seed, "valid_fraction": ctx.valid_fraction,
            "data": data_fingerprint(data, valid), **({"processes": nproc} if nproc > 1 else {}),
        })
        summary = train_network(net, data, valid, params=params, ctx=ctx, horizon_days=self.horizon_days,
                                device=device, run_fingerprint=run_fingerprint, nproc_per_node=nproc)
        self.network, self.device = net, device
        self.fit_summary = summary
        return summary

    # -- predict --------------------------------------------------------------------------------
    def _forward(self) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """The fitted network in eval mode, as batch -> raw float32 outputs [B, 3]."""
        if self.network is None:
            raise RuntimeError(f"{self.name} model is not fitted")
        network = self.network
        if network.training:  # eval() walks every submodule: a tenth of a small request's time
            network.eval()
        # Scoring runs in float32 on every device (bf16 is for training only), so a model gives the
        # same predictions on CUDA and, after loading, on CPU up to float rounding.
        return lambda batch: network(batch).float()

    def _serving_forward(self, example: dict[str, np.ndarray]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """_forward(), traced by TorchScript where the subclass allows it (traced_inference, CPU):
        traced once per fitted network on the first batch scored, and used only if it gives exactly
        the eager outputs on it (else eager, for good)."""
        eager = self._forward()
        if not self.traced_inference or self.device.type != "cpu":
            return eager
        cached = self._traced
        if cached is None or cached[0] is not self.network:  # two threads may both trace: either result is right
            checks = [as_batch(part, self.device) for part in _shape_variants(example)]
            cached = self._traced = (self.network, *_traced_or_eager(self.network, eager, *checks))
        return cached[1]

    @property
    def serving_is_traced(self) -> bool:
        """Whether predict_arrays runs the TorchScript trace (False before its first call)."""
        return self._traced is not None and self._traced[2]

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        data = self.tensors(features, labels=False)
        p_buy = np.empty(len(data))
        value = np.empty(len(data))
        batch_size = self.params.predict_batch_size  # type: ignore[attr-defined]
        for index, out in map_batches(data, self._forward(), batch_size, self.device):
            p, ev = ziln.predict(out, self.horizon_days)
            p_buy[index.numpy()] = p.double().cpu().numpy()
            value[index.numpy()] = ev.double().cpu().numpy()
        return self._frame(features, p_buy, value)

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        """(p_buy, expected_value) of the online engine's arrays: no DataFrame, one tensor conversion
        per chunk of rows, the TorchScript trace on the CPU (_serving_forward); the numbers of
        predict() (exp of the float32 ZILN logs)."""
        n = len(features)
        if n == 0:
            return np.zeros(0), np.zeros(0)
        batch = batch_arrays(features, self.feature_columns, self.spec.sequence_length,
                             user_buckets=self.user_buckets)
        forward = self._serving_forward(batch)
        log_p = torch.empty(n, dtype=torch.float32)
        log_ev = torch.empty(n, dtype=torch.float32)
        with torch.inference_mode():
            for rows, part in _length_chunks(batch, self.params.predict_batch_size,  # type: ignore[attr-defined]
                                             self.spec.sequence_length):
                raw = forward(as_batch(part, self.device))
                lp = ziln.log_p_buy(raw, self.horizon_days)
                index = slice(None) if rows is None else torch.from_numpy(rows)
                log_p[index] = lp.cpu()
                log_ev[index] = ziln.log_expected_value(raw, self.horizon_days, log_p=lp).cpu()
        p_buy = torch.exp(log_p).double().numpy()
        value = torch.exp(log_ev).double().numpy()
        return np.clip(p_buy, 0.0, 1.0), np.maximum(value, 0.0)

    # -- persistence ----------------------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        if self.network is None:
            raise RuntimeError(f"{self.name} model is not fitted")
        net = self.network
        torch.save({
            "state_dict": cpu_state(net),
            "agg_stats": net.agg_stats.to_dict(),
            "token_stats": net.token_stats.to_dict(),
            "bias": list(net.initial_bias),
        }, directory / WEIGHTS_FILE)
        (directory / FIT_SUMMARY_FILE).write_text(json.dumps({
            "fit_summary": {k: v for k, v in self.fit_summary.items()},
        }, indent=2, default=str))

    def _load_state(self, directory: Path) -> None:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        net = self.build_network(AggregateStats.from_dict(state["agg_stats"]),
                                 TokenStats.from_dict(state["token_stats"]), tuple(state["bias"]))
        net.load_state_dict(state["state_dict"])
        self.device = resolve_device("auto")
        self.network = net.to(self.device).eval()
        summary_path = directory / FIT_SUMMARY_FILE
        if summary_path.is_file():
            self.fit_summary = json.loads(summary_path.read_text()).get("fit_summary") or {}


# Sequence inputs of a model batch (data.batch_arrays): [rows, width(, ...)], padded after each row's tokens.
SEQUENCE_INPUTS = ("behavior", "category", "item", "continuous")
# Rows per forward pass when a call scores more rows than this: grouped by sequence length, each row
# padded to a width of its own (its length rounded up to a power of two, at most the sequence length),
# not the call's longest row: on logs of mostly short histories several times less attention and
# feed-forward work (1,000 CDNOW users by id: issue 15). A row's numbers then do not depend on the
# other rows of the call either (float32 sums over a padded width round with the width).
LENGTH_CHUNK_ROWS = 1024
# Calls of more rows than this are grouped by width; fewer (one request's rows) go in one pass. Not
# LENGTH_CHUNK_ROWS: 1,000 CDNOW users scored without their coalition rows are 1,008 rows, and padded to
# the longest history in one pass they took 96 ms against 45 ms grouped.
LENGTH_GROUPING_ROWS = 64


def _length_chunks(batch: dict[str, np.ndarray], max_rows: int, sequence_length: int,
                   ) -> Iterator[tuple[np.ndarray | None, dict[str, np.ndarray]]]:
    """(rows, their batch) covering `batch`: the whole of it (rows None) when it has at most
    LENGTH_GROUPING_ROWS rows (and at most `max_rows`), else groups of at most LENGTH_CHUNK_ROWS rows of one
    padded width each."""
    lengths = batch["lengths"]
    n = len(lengths)
    size = min(LENGTH_CHUNK_ROWS, max_rows)
    if n <= min(size, LENGTH_GROUPING_ROWS):
        yield None, batch
        return
    own = np.minimum(1 << np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64), max(sequence_length, 1))
    order = np.lexsort((np.arange(n), own))
    bounds = np.flatnonzero(np.diff(own[order])) + 1
    for group in np.split(order, bounds):
        width = int(own[group[0]])
        for start in range(0, len(group), size):
            rows = group[start:start + size]
            yield rows, {k: (_padded(v[rows], width) if k in SEQUENCE_INPUTS else v[rows]) for k, v in batch.items()}


def _padded(values: np.ndarray, width: int) -> np.ndarray:
    """values [rows, w, ...] cut or zero-padded to [rows, width, ...]."""
    if values.shape[1] >= width:
        return np.ascontiguousarray(values[:, :width])
    out = np.zeros((values.shape[0], width, *values.shape[2:]), dtype=values.dtype)
    out[:, :values.shape[1]] = values
    return out


def _shape_variants(example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """`example`, and the same rows twice with one more padding column: a trace must give eager's
    outputs on other row counts and widths too, not only on the shapes it was traced on."""
    wider = {}
    for k, v in example.items():
        v = np.concatenate([v, v])
        if k in SEQUENCE_INPUTS:
            v = np.concatenate([v, np.zeros_like(v[:, :1])], axis=1)
        wider[k] = np.ascontiguousarray(v)
    return [example, wider]


def _traced_or_eager(network: nn.Module, eager: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                     example: dict[str, torch.Tensor], *checks: dict[str, torch.Tensor],
                     ) -> tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], bool]:
    """(the network traced on `example`, float32 outputs as _forward's; True), or (`eager`, False)
    when tracing fails or the trace does not reproduce the eager outputs bit for bit on `example`
    and on each of `checks` (batches of other shapes).

    torch.jit.trace is deprecated in favour of torch.export and torch.compile, but neither serves
    a few rows faster here: the exported program's module took 0.50 ms per call against eager's
    0.28 ms and the trace's 0.16 ms (torch 2.13, 2 rows), and torch.compile needs a compiler
    toolchain at start-up and recompiles per input shape. Hence the trace, its deprecation
    warning silenced, and eager whenever it cannot be used."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(network, (example,), strict=False, check_trace=False)
        with torch.inference_mode():
            same = all(torch.equal(traced(batch).float(), eager(batch)) for batch in (example, *checks))
    except Exception:  # noqa: BLE001 - any failure to trace only costs the speed-up
        return eager, False
    return ((lambda batch: traced(batch).float()), True) if same else (eager, False)
