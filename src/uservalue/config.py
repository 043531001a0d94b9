"""Typed view of params.yaml: one section per stage, errors that name the field at fault."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from uservalue import limits
from uservalue.errors import ConfigError
from uservalue.schema import DEFAULT_BEHAVIORS, PURCHASE, RETURN


class _Section(BaseModel):
    # A typo in params.yaml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _utc(value: dt.date | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)


class TaobaoSource(_Section):
    """Taobao has no prices: a purchase is worth `purchase_amount`, or its category's value."""

    purchase_amount: float = Field(1.0, ge=0)
    category_amount_table: str | None = Field(
        None, description="CSV with columns category_id,amount; other categories get purchase_amount"
    )


class FileReturns(_Section):
    """Lines whose `column` starts with `prefix` are returns (UCI Online Retail: Invoice 'C...')."""

    column: str = Field(min_length=1, description="column of the file (read as text)")
    prefix: str = Field(min_length=1, description="a value starting with this marks a return")


class FileSource(_Section):
    """A user's own CSV or Parquet file: which of its columns is which canonical column."""

    format: Literal["auto", "csv", "parquet"] = "auto"
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = True
    # Before `columns`, whose check reads it.
    default_behavior: str | None = Field(
        None, description="canonical behaviour of every line when columns.behavior is null "
                          "(an order export: buy)")
    columns: dict[str, str | None] = Field(
        default_factory=lambda: {
            "user_id": "user_id",
            "ts": "ts",
            "behavior": "behavior",
            "item_id": "item_id",
            "category_id": "category_id",
            "quantity": "quantity",
            "amount": "amount",
        },
        description="canonical column -> column in the file (null: the file has none)",
    )
    behaviors: dict[str, str] = Field(
        default_factory=lambda: {b: b for b in DEFAULT_BEHAVIORS},
        description="behaviour name in the file -> canonical behaviour",
    )
    ts_format: str = Field(
        "iso", description="iso | unix_s | unix_ms | a strftime pattern such as %Y-%m-%d %H:%M"
    )
    purchase_amount: float = Field(
        1.0, ge=0, description="value of a purchase when the file has no amount or unit_price column"
    )
    missing_user: Literal["error", "drop"] = Field(
        "error", description="a line without a user id: error, or drop it (counted in the ingest summary "
                             "and written with the reason to the rejects file)")
    returns: FileReturns | None = Field(
        None, description="lines that are returns by a column's prefix (an Online Retail cancellation: "
                          "{column: Invoice, prefix: C}); with 'return' in data.behaviors, negative purchase lines are too")
    id_normalize: bool = Field(
        True, description="ids written as floats by spreadsheets ('12345.0') read as '12345'")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str | None], info: ValidationInfo) -> dict[str, str | None]:
        from uservalue.schema import EVENT_COLUMNS, OPTIONAL_COLUMNS

        # unit_price: amount = quantity x unit price; item_text: optional (issue 23)
        allowed = [*EVENT_COLUMNS, *OPTIONAL_COLUMNS, "unit_price"]
        unknown = sorted(set(columns) - set(allowed))
        if unknown:
            raise ValueError(f"unknown canonical columns {unknown}; allowed: {allowed}")
        missing = [c for c in ("user_id", "ts") if not columns.get(c)]
        if not columns.get("behavior") and not info.data.get("default_behavior"):
            missing.append("behavior")
        if missing:
            hint = (" (or set data.file.default_behavior, e.g. buy for a purchase-only file)"
                    if "behavior" in missing else "")
            raise ValueError(f"required canonical columns {missing} need a source column{hint}")
        return columns


class SyntheticTitles(_Section):
    """Item titles with planted value (issue 23): each item's title is `words_per_title` words of a vocabulary
    of `words`; the first `value_words` of it raise the price (x exp(price_effect) per word) and the purchase
    propensity (x exp(buy_effect) per word) of the items they name, and users lean towards such items by a
    persistent latent share (up to `lean`), so the text of what a user saw tells their future value."""

    words: int = Field(60, ge=2, description="vocabulary size")
    words_per_title: int = Field(3, ge=1, le=12)
    value_words: int = Field(6, ge=1, description="the first words of the vocabulary carry the planted value")
    price_effect: float = Field(0.4, ge=0, le=3, description="log price multiplier per value word in a title")
    buy_effect: float = Field(0.5, ge=0, le=3, description="log purchase propensity multiplier per value word")
    lean: float = Field(0.6, ge=0, le=1, description="largest share of a user's events moved to value items")
    lean_from_spend: float = Field(1.0, ge=0, le=1, description="share of a user's lean level set by their spend "
                                                                "level; the rest an independent draw (0: only "
                                                                "the text of what they see shows it)")
    consider_days: float = Field(0.0, ge=0, le=365, description="extra mean delay (days, exponential) from seeing "
                                                                "a value item to buying it, per value word: what a "
                                                                "user saw lately is bought after the cutoff; 0: none")
    onset: bool = Field(False, description="each user's lean begins on a day drawn uniformly over their life (none "
                                           "before): their recent views show it before their purchases do")

    @model_validator(mode="after")
    def _value_words_fit(self) -> SyntheticTitles:
        if self.value_words >= self.words:
            raise ValueError("titles.value_words must be fewer than titles.words")
        return self


class SyntheticSource(_Section):
    """A Taobao-like log with planted ground truth (see uservalue.data.sources.synthetic)."""

    users: int = Field(20_000, ge=1)
    events_per_user: float = Field(100.0, gt=0, description="mean non-purchase events per user")
    # The default calendar matches CDNOW's so that one split config serves both sources.
    start: dt.date = dt.date(1997, 1, 1)
    days: int = Field(546, ge=2)
    seed: int = 0
    drift: float = Field(0.0, ge=0, le=1, description="0: reference behaviour; 1: strongly shifted")
    categories: int = Field(500, ge=1)
    items_per_category: int = Field(100, ge=1)
    behavior_mix: dict[str, float] = Field(
        default_factory=lambda: {"view": 0.89, "fav": 0.035, "cart": 0.075},
        description="share of each non-purchase behaviour",
    )
    influence: dict[str, float] = Field(
        default_factory=lambda: {"view": 0.004, "fav": 0.04, "cart": 0.2},
        description="planted probability that one event of this behaviour leads to a purchase",
    )
    purchase_delay_days: float = Field(3.0, gt=0)
    mean_lifetime_days: float = Field(400.0, gt=0)
    chunk_events: int = Field(2_000_000, ge=10_000, description="events held in memory at once")
    # Planted user-item affinity (the recommender's truth, issue 18): users of one taste favour the same few
    # items of each category. 0: items by popularity alone (the log of earlier versions, unchanged).
    affinity: float = Field(0.0, ge=0, le=1, description="share of events on the user's taste's favourite items")
    tastes: int = Field(20, ge=1, description="taste groups of users that share favourite items")
    favorites_per_category: int = Field(5, ge=1, description="favourite items of a taste in each category")
    # Item titles (item_text) with planted word value (issue 23); null: no text column (the log is unchanged).
    titles: SyntheticTitles | None = Field(None, description="item titles with planted value; null: none")

    @model_validator(mode="after")
    def _influence_matches_mix(self) -> SyntheticSource:
        if set(self.influence) != set(self.behavior_mix):
            raise ValueError("influence and behavior_mix must name the same behaviours")
        if PURCHASE in self.behavior_mix:
            raise ValueError(f"'{PURCHASE}' is generated from the other behaviours, not mixed in")
        if any(not 0 <= p <= 1 for p in self.influence.values()):
            raise ValueError("influence values are probabilities in [0, 1]")
        return self


class DataParams(_Section):
    source: Literal["cdnow", "taobao", "synthetic", "file"] = "cdnow"
    path: str | None = Field(None, description="the file read by the taobao and file sources")
    event_log: str | None = Field(
        None, description="events logged by the service's /events (date=*/part-*.parquet); when set and present, "
                          "ingest appends them to the source's events (once per user and event_id)")
    behaviors: tuple[str, ...] = DEFAULT_BEHAVIORS
    taobao: TaobaoSource = TaobaoSource()
    file: FileSource = FileSource()
    synthetic: SyntheticSource = SyntheticSource()
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="the ingest stage's engine: duckdb (embedded) | spark (the session of params "
                              "`spark`; uservalue.data.spark_ingest); the same canonical events")
    external_root: str | None = Field(
        None, description="a folder outside the workspace (or file://...): a data stage whose output path names "
                          "a manifest (*.manifest.json) writes its Parquet here and the manifest in the workspace "
                          "(uservalue.data.manifest)")

    @field_validator("behaviors")
    @classmethod
    def _behaviors_are_names(cls, behaviors: tuple[str, ...]) -> tuple[str, ...]:
        # They become feature column names (view_count_7d, ...), so keep them identifiers.
        bad = [b for b in behaviors if not re.fullmatch(r"[a-z][a-z0-9_]*", b)]
        if bad:
            raise ValueError(f"{bad}: behaviour names must be lower-case identifiers like 'add_to_cart'")
        if len(set(behaviors)) != len(behaviors):
            raise ValueError("behaviour names must be unique")
        return behaviors

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataParams:
        if self.source in ("taobao", "file") and not self.path:
            raise ValueError(f"data.source '{self.source}' reads a file: set data.path")
        if PURCHASE not in self.behaviors:
            raise ValueError(f"data.behaviors must contain '{PURCHASE}'")
        if self.source == "file" and self.file.returns is not None and RETURN not in self.behaviors:
            raise ValueError(f"data.file.returns is set: add '{RETURN}' to data.behaviors "
                             f"(e.g. [{PURCHASE}, {RETURN}]) so returns are kept as events")
        return self


AUTO = "auto"  # a split or window value derived from the source and the data (uservalue.data.window)


class ValidateParams(_Section):
    mode: Literal["fail", "quarantine", "auto"] = Field(
        "fail", description="auto: quarantine for a source documented to hold out-of-window rows (Taobao), "
                            "else fail (uservalue.data.window)")
    ts_min: dt.date | dt.datetime | Literal["auto"] | None = Field(
        None, description="inclusive lower bound; auto: the source's window (uservalue.data.window)")
    ts_max: dt.date | dt.datetime | Literal["auto"] | None = Field(
        None, description="exclusive upper bound; auto: the source's window (uservalue.data.window)")
    max_duplicate_share: float = Field(0.01, ge=0, le=1)
    min_users: int = Field(1, ge=0)
    min_purchases: int = Field(1, ge=0)
    max_quarantine_share: float = Field(0.05, ge=0, le=1)
    example_rows: int = Field(5, ge=1)
    batch_rows: int = Field(
        1_000_000, ge=1,
        description="rows validated at once: row-level expectations run per batch of this many rows (bounded "
                    "memory); table-level ones are DuckDB aggregates over the whole file")
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="duckdb (embedded: pandas batches and DuckDB aggregates) | spark (Great "
                              "Expectations' Spark datasource on the session of params `spark`); the same verdict")

    @property
    def window(self) -> tuple[dt.datetime | None, dt.datetime | None]:
        auto = [f"validate.{k}" for k in ("ts_min", "ts_max") if getattr(self, k) == AUTO]
        if auto:
            raise ConfigError(f"{', '.join(auto)} is auto: resolve it for the source first "
                              "(uservalue.data.window.resolve_window)")
        return (
            _utc(self.ts_min) if self.ts_min is not None else None,
            _utc(self.ts_max) if self.ts_max is not None else None,
        )


class DuckDBParams(_Section):
    """Every DuckDB connection the project opens (uservalue.duck): a stage's own memory_limit is capped by
    this one, and sorts, joins and aggregates spill to temp_directory beyond it."""

    memory_limit: str = Field("4GB", pattern=r"^\s*\d+(\.\d+)?\s*[KMGT]?i?B\s*$",
                              description="DuckDB memory limit, e.g. 4GB or 512MiB (it spills beyond)")
    threads: int = Field(0, ge=0, description="DuckDB threads when a stage sets none; 0 = all cores")
    temp_directory: str = Field("tmp/duckdb", min_length=1,
                                description="spill folder (relative: to the working directory, the project)")


class FeaturizeParams(_Section):
    sequence_length: int = Field(50, ge=1)
    windows_days: tuple[int, ...] = (7, 30, 90, 365)
    category_buckets: int = Field(1024, ge=1)
    item_buckets: int = Field(16384, ge=1)
    threads: int = Field(0, ge=0, description="DuckDB threads; 0 = all cores")
    memory_limit: str = Field("4GB", description="DuckDB memory limit (it spills beyond)")
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="duckdb (embedded) | spark (the session of params `spark`); the same features")


class SparkParams(_Section):
    """The Spark session of stages run with engine `spark` (uservalue.features.spark)."""

    master: str = Field("local[*]", min_length=1,
                        description="spark.master, e.g. local[*], spark://host:7077, yarn; SPARK_MASTER wins")
    driver_memory: str = Field("2g", pattern=r"^\d+[kmgt]?$", description="spark.driver.memory, e.g. 2g")
    config: dict[str, str] = Field(default_factory=dict, description="more Spark conf, key -> value")

    @field_validator("config", mode="before")
    @classmethod
    def _conf_values_as_text(cls, value: Any) -> Any:
        # YAML reads 4 and true as numbers and booleans; Spark conf values are strings.
        if isinstance(value, Mapping):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value


class SplitPreset(_Section):
    """What `auto` means for one data.source (params split.sources.<source>); a key left out is derived
    from the log."""

    eval_cutoff: dt.date | dt.datetime | None = None
    horizon_days: int | None = Field(None, ge=1)
    train_cutoffs: tuple[dt.date | dt.datetime, ...] | None = None


class SplitParams(_Section):
    """The cutoffs. Each of eval_cutoff, horizon_days and train_cutoffs may be `auto`: the source's entry in
    `sources`, else derived from the validated log's time range (uservalue.data.window.resolve_split; the
    featurize stage writes the result to reports/split.json)."""

    eval_cutoff: dt.date | dt.datetime | Literal["auto"]
    horizon_days: Annotated[int, Field(ge=1)] | Literal["auto"]
    train_cutoffs: tuple[dt.date | dt.datetime, ...] | Literal["auto"] = ()
    train_count: int = Field(2, ge=0, description="auto train_cutoffs: at most this many, stepped back from "
                                                  "eval_cutoff")
    sources: dict[str, SplitPreset] = Field(
        default_factory=dict, description="data.source -> the values `auto` takes for it (CDNOW: the BTYD split)")

    @model_validator(mode="after")
    def _train_before_eval(self) -> SplitParams:
        if self.eval_cutoff == AUTO or self.train_cutoffs == AUTO:
            return self
        bad = [str(c) for c in self.train_cutoffs if _utc(c) >= _utc(self.eval_cutoff)]
        if bad:
            raise ValueError(f"train_cutoffs {bad} must be earlier than eval_cutoff {self.eval_cutoff}")
        return self

    @property
    def is_resolved(self) -> bool:
        return AUTO not in (self.eval_cutoff, self.horizon_days, self.train_cutoffs)

    def _require_resolved(self) -> None:
        if not self.is_resolved:
            auto = [f"split.{k}" for k in ("eval_cutoff", "horizon_days", "train_cutoffs") if getattr(self, k) == AUTO]
            raise ConfigError(f"{', '.join(auto)} is auto: resolve the split from the validated log first "
                              "(uservalue.data.window.resolve_split, reports/split.json)")

    @property
    def eval_cutoff_utc(self) -> dt.datetime:
        self._require_resolved()
        return _utc(self.eval_cutoff)  # type: ignore[arg-type]

    @property
    def train_cutoffs_utc(self) -> tuple[dt.datetime, ...]:
        self._require_resolved()
        return tuple(sorted(_utc(c) for c in self.train_cutoffs))  # type: ignore[union-attr]


# The model catalog, the one list of models: name -> "module:Class" (imported on first use by
# uservalue.models). Adding a model is one module plus one entry here; its params section
# `train.<name>` and its DVC stage `train@<name>` follow from this entry.
MODEL_CATALOG: dict[str, str] = {
    "historical": "uservalue.models.historical:HistoricalModel",
    "btyd": "uservalue.models.btyd:BtydModel",
    "gbdt": "uservalue.models.gbdt:GbdtModel",
    "linear": "uservalue.models.linear:LinearModel",
    "mlp": "uservalue.models.deep.mlp:MlpModel",
    "sequence": "uservalue.models.deep.sequence:SequenceModel",
    "gnn": "uservalue.models.deep.gnn:GnnModel",
    "ensemble": "uservalue.models.ensemble:EnsembleModel",
}
MODEL_NAMES = tuple(MODEL_CATALOG)

# Every evaluation metric and its direction (True: higher is better). total_error is compared by
# its absolute value (0 is perfect).
METRICS: dict[str, bool] = {
    "gini": True,
    "spearman": True,
    "mae": False,
    "rmse": False,
    "top_decile_capture": True,
    "decile_mape": False,
    "total_error": False,
    "auc": True,
}
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]


# Keys of a `train.<model>` section that the train stage reads itself (not passed to the model).
STAGE_TRAIN_KEYS = ("max_train_rows", "distributed")
# The models `train.<model>.distributed` runs on several processes (torchrun + DistributedDataParallel).
DISTRIBUTED_MODELS = ("mlp", "sequence")


class _TrainBase(_Section):
    """Which models to train; each model's own section is typed by the model itself."""

    models: tuple[str, ...] = MODEL_NAMES
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    valid_fraction: float = Field(0.2, ge=0, lt=1, description="users held out for early stopping")
    influence_users: int = Field(2000, ge=0, description="training rows the behaviour-influence tables "
                                                         "(effect, share) are computed on; 0: none")

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in models if m not in MODEL_CATALOG]
        if unknown:
            raise ValueError(f"unknown models {unknown}; known: {list(MODEL_NAMES)}")
        if not models:
            raise ValueError("name at least one model")
        if len(set(models)) != len(models):
            raise ValueError("each model once")
        return models

    def model_params(self, name: str) -> dict[str, Any]:
        """The model's own params (`train.<model>` less the keys the train stage reads itself)."""
        return {k: v for k, v in getattr(self, name).items() if k not in STAGE_TRAIN_KEYS}

    def max_train_rows(self, name: str) -> int | None:
        """`train.<model>.max_train_rows`: at most this many training rows, whole users sampled with
        `train.seed` (the sequence model's CPU budget at 10^6 users); null or absent: every row."""
        value = getattr(self, name).get("max_train_rows")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"train.{name}.max_train_rows: expected a positive integer or null, got {value!r}")
        return value

    def nproc_per_node(self, name: str) -> int:
        """`train.<model>.distributed: {nproc_per_node: N}`: train on N processes of this machine under
        torchrun with DistributedDataParallel (NCCL, one GPU each, on CUDA; gloo on the CPU); the
        deep models only. Null or absent: 1, one process."""
        value = getattr(self, name).get("distributed")
        if value is None:
            return 1
        where = f"train.{name}.distributed"
        if not isinstance(value, dict) or set(value) - {"nproc_per_node"}:
            raise ConfigError(f"{where}: expected {{nproc_per_node: N}}, got {value!r}")
        n = value.get("nproc_per_node", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}.nproc_per_node: expected a positive integer, got {n!r}")
        if n > 1 and name not in DISTRIBUTED_MODELS:
            raise ConfigError(f"{where}: only {list(DISTRIBUTED_MODELS)} train on several processes, not {name}")
        return n


# One `train.<model>` section per catalog entry.
TrainParams = create_model(
    "TrainParams",
    __base__=_TrainBase,
    **{name: (dict[str, Any], Field(default_factory=dict)) for name in MODEL_CATALOG},
)


class MetricBound(_Section):
    """An absolute bound on one metric: min (at least `target`), max (at most), abs (|value| at most)."""

    target: float
    direction: Literal["min", "max", "abs"] = Field(
        description="min: at least `target`; max: at most `target`; abs: |value| at most `target`")

    def holds(self, value: float | None) -> bool:
        if value is None or math.isnan(value):  # NaN never meets a bound
            return False
        if self.direction == "min":
            return value >= self.target
        if self.direction == "max":
            return value <= self.target
        return abs(value) <= self.target


class EvaluateParams(_Section):
    primary_metric: MetricName = "gini"
    # Ranking alone picks a model whose totals and deciles can be far off; users spend by those, so the
    # champion is the best by primary_metric among the models that meet every requirement (the register
    # gate applies the same ones). When none does, the best by primary_metric, flagged in metrics.json.
    requirements: dict[MetricName, MetricBound] = Field(
        default_factory=dict, description="metric -> absolute bound a champion must meet")


class SearchDimension(_Section):
    """One hyperparameter's range in `tune.space.<model>`: low..high (log scale if `log`), or choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    type: Literal["float", "int"] = "float"
    choices: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchDimension:
        if self.choices is None and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("give low <= high, or choices")
        if self.log and self.choices is None and self.low is not None and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class TuneParams(_Section):
    """`uservalue tune --model <m>` (Optuna): not a DVC stage; it writes its best into train.<m>."""

    trials: int = Field(50, ge=1)
    timeout_s: float | None = Field(None, gt=0, description="stop starting trials after this long")
    seed: int = 0
    valid_fraction: float = Field(0.2, gt=0, lt=1, description="users held out, scored at the latest training cutoff")
    metric: MetricName | None = Field(None, description="null: evaluate.primary_metric")
    space: dict[str, dict[str, SearchDimension]] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _known_models(cls, space: dict[str, dict[str, SearchDimension]]) -> dict[str, dict[str, SearchDimension]]:
        unknown = [m for m in space if m not in MODEL_CATALOG]
        if unknown:
            raise ValueError(f"unknown models {unknown}; known: {list(MODEL_NAMES)}")
        return space


class RegisterParams(_Section):
    model_name: str = Field("user-value", min_length=1)
    primary_metric: MetricName = "gini"
    min_delta: float = Field(0.0, ge=0, description="how much the candidate must beat the champion by")
    guards: dict[MetricName, float] = Field(
        default_factory=lambda: {"auc": 0.01, "spearman": 0.02},
        description="metric -> how much worse than the champion the candidate may be",
    )


class TrackingParams(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db")
    experiment: str = Field("uservalue", min_length=1)
    artifact_location: str | None = Field(None, description="for a new experiment; default ./mlartifacts")


class PackageParams(_Section):
    """The package stage: the registered champion into the BentoML model store, then `bentoml build`."""

    bento_name: str = Field("uservalue", min_length=1, description="name of the built Bento (bentofile.yaml's `name`)")
    model_alias: str = Field("champion", min_length=1, description="registry alias that is packaged")
    bentoml_home: str | None = Field(
        None, description="BentoML store; BENTOML_HOME wins; default .bentoml in the project (git-ignored)"
    )
    keep_bentos: int = Field(5, ge=1, description="Bentos of this name kept in the store (older ones, and "
                                                 "models no kept Bento uses, are deleted)")


class StoreParams(_Section):
    """The online store of per-user events the service scores users by id from (USERVALUE_STORE_URL wins)."""

    url: str = Field("sqlite:///data/online/store.sqlite",
                     description="sqlite:///<path> (relative: the project's) | redis://[:password@]host:port/db")
    namespace: str = Field("uservalue", pattern=r"^[A-Za-z0-9_.-]+$", description="Redis key prefix")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if url.partition("://")[0].lower() not in ("sqlite", "redis", "rediss", "unix") or "://" not in url:
            raise ValueError("expected sqlite:///<path> or redis://host:port/db")
        return url


class MaterializeParams(_Section):
    """The materialize stage: every user's events into the online store, streamed in batches of whole users."""

    memory_limit: str = Field("2GB", description="DuckDB memory limit (its sort spills beyond)")
    threads: int = Field(0, ge=0, description="DuckDB threads; 0 = all cores")
    batch_events: int = Field(500_000, ge=1_000, description="events encoded and written at once (whole users)")


class ServeParams(_Section):
    """The service's limits and its prediction log; each can be overridden by a USERVALUE_* env var
    (the API key is only ever an env var: USERVALUE_API_KEY)."""

    max_users: int = Field(limits.MAX_USERS_PER_REQUEST, ge=1, description="users per /predict request; more is refused with 413")
    max_events: int = Field(limits.MAX_EVENTS_PER_REQUEST, ge=1,
                            description="events per /predict request; more is refused with 413")
    log_dir: str = Field("data/prediction_log", description="prediction log (Parquet, one folder per day)")
    event_log_dir: str = Field("data/event_log", description="events accepted by /events (Parquet, one folder per day)")
    log_flush_records: int = Field(1000, ge=1, description="records buffered before a log file is written")
    log_flush_seconds: float = Field(5.0, gt=0, description="longest a record waits in the buffer")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000,
        description="under load, how long a batch may wait for as many requests as the previous one held "
                    "(0: never wait; a lone request never waits)")
    store: StoreParams = StoreParams()


class MonitorParams(_Section):
    """Drift of the served predictions (Evidently): thresholds that turn a report into a verdict."""

    current: Literal["batch", "log"] = Field(
        "batch", description="batch: score the events at as_of; log: the service's prediction log"
    )
    as_of: dt.datetime | Literal["latest"] | None = Field(
        None, description="batch: scoring time; null = the reference's cutoff moved on by how much the log grew "
                          "since featurize (like with like); latest = the day after the last event")
    log_days: int = Field(1, ge=1, description="log: how many days of the prediction log form the current window")
    prediction_columns: tuple[str, ...] = ("expected_value", "p_buy")
    feature_columns: tuple[str, ...] = ("recency_days", "n_events", "monetary_sum", "buy_count", "tenure_days")
    method: str = Field("wasserstein", description="Evidently numerical drift method (a distance)")
    column_threshold: float = Field(0.1, gt=0, description="a column drifts when its distance reaches this")
    drift_share: float = Field(0.5, gt=0, le=1, description="share of drifted columns that flags drift")
    min_rows: int = Field(100, ge=1, description="fewer current rows than this is an error, not a verdict")
    max_rows: int | None = Field(
        100_000, ge=1, description="each window larger than this is sampled to this many rows (fixed seed) before "
                                   "Evidently, which holds both windows in memory; null: never sample")
    seed: int = Field(0, description="the sampling seed (max_rows)")


class MetricTarget(MetricBound):
    """A quality target for one metric, with the best anchor measured on the same split (for the report)."""

    anchor: float | None = None
    anchor_source: str = ""


class ReportParams(_Section):
    """The report stage: reports/index.html, one page for the outcome of a run."""

    targets: dict[MetricName, MetricTarget] = Field(
        default_factory=dict, description="metric -> target and anchor (params.yaml holds CDNOW's, issue 16)")
    mlflow_ui: str | None = Field("http://127.0.0.1:5000", description="where `make mlflow-ui` serves; null: no link")


RecsMetric = Literal["recall_at_20", "ndcg_at_20", "hit_rate_at_10", "coverage"]


class RecsParams(_Section):
    """The train_recs stage: top-K recommenders fitted on events before split.eval_cutoff, scored on the
    split.horizon_days after it; the best is registered as its own model, promoted through a gate."""

    models: dict[Literal["popularity", "cooccurrence", "nextitem", "taste", "graph"], dict[str, Any]] = Field(
        default_factory=lambda: {"popularity": {}, "cooccurrence": {}, "nextitem": {}, "taste": {}},
        description="recommender kind -> its params (uservalue.recs)")
    exclude_bought: bool = Field(True, description="leave out items the user bought (also the service's default)")
    truth_behaviors: list[str] | None = Field(None, description="behaviours whose items after the cutoff are the truth; null: all")
    max_eval_users: int | None = Field(5000, ge=1, description="users evaluated (a sample with train.seed); null: all")
    max_train_users: int | None = Field(
        100_000, ge=1, description="users whose events the recommenders see (whole users sampled with train.seed, "
                                "before anything is read into memory); null: all. The stage holds their events in "
                                "pandas: 20.7 GiB for 969,503 users' 10^8 events, 3.9 GiB for 100,000 (issue 13)")
    primary_metric: RecsMetric = "recall_at_20"
    model_name: str = Field("user-recs", min_length=1)
    min_delta: float = Field(0.0, ge=0, description="how much the candidate must beat the champion by")
    guards: dict[RecsMetric, float] = Field(default_factory=lambda: {"ndcg_at_20": 0.01},
                                            description="metric -> how much worse than the champion the candidate may be")


class EmbedItemsParams(_Section):
    """The embed_items stage (issue 23): each distinct item text through the shipped all-MiniLM-L6-v2
    (uservalue.text), cached by text hash."""

    batch_size: int = Field(64, ge=1, description="texts per forward pass")
    max_length: int = Field(128, ge=8, le=512, description="tokens read of each text")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    pca_dim: int | None = Field(32, ge=1, le=384, description="output vector size (PCA of the 384-d vectors, "
                                                              "fitted on the distinct texts); null: 384")
    cache_dir: str = Field("tmp/text_cache", description="embeddings by text hash and the unpacked model "
                                                       "(git-ignored; a cache: never changes a result)")
    seed: int = Field(0, description="PCA's seed")
    # The per-user text features featurize joins (uservalue.text.features), written into the vectors file's
    # metadata so that featurize and the service read one definition.
    feature_behaviors: list[str] = Field(default_factory=lambda: ["view", "cart", "buy"], min_length=1,
                                         description="behaviours whose last items' vectors are pooled per user")
    feature_last: int = Field(20, ge=1, description="items pooled per behaviour (the user's last L before the cutoff)")
    feature_dim: int = Field(16, ge=1, le=384, description="leading components kept per behaviour")


class Params(_Section):
    # Sections of later stages are theirs to type; tolerate them here.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    featurize: FeaturizeParams = FeaturizeParams()
    split: SplitParams
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    tracking: TrackingParams = TrackingParams()
    package: PackageParams = PackageParams()
    serve: ServeParams = ServeParams()
    materialize: MaterializeParams = MaterializeParams()
    monitor: MonitorParams = MonitorParams()
    duckdb: DuckDBParams = DuckDBParams()
    report: ReportParams = ReportParams()
    spark: SparkParams = SparkParams()
    recs: RecsParams = RecsParams()
    embed_items: EmbedItemsParams = EmbedItemsParams()


def describe_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]).replace("validate_", "validate").replace("register_", "register")
        lines.append(f"{source}: {field or '(top level)'}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """["train.models=[linear, mlp]", "split.horizon_days=90"] -> {dotted key: YAML value} (as `dvc exp run -S`)."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r}: expected <section.key>=<value>, e.g. split.horizon_days=90")
        try:
            overrides[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({error})") from None
    return overrides


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """A deep copy of the params with each dotted key replaced; a key params.yaml lacks is an error."""
    out = yaml.safe_load(yaml.safe_dump(dict(raw)))  # deep copy of plain YAML data
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        target = out
        walked: list[str] = []
        for part in parents:
            walked.append(part)
            if not isinstance(target.get(part), dict):
                raise ConfigError(f"override {dotted!r}: {source} has no section {'.'.join(walked)!r}")
            target = target[part]
        if leaf not in target:
            known = ", ".join(sorted(map(str, target))) or "none"
            raise ConfigError(f"override {dotted!r}: {source} has no key {leaf!r} there (known: {known})")
        target[leaf] = value
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    return parse_params(raw, str(path))
