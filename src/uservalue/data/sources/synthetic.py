"""A Taobao-like behaviour log with planted ground truth (influence per behaviour, seasonality, a
drift knob, user-item affinities), streamed to Parquet in bounded memory (the generative story: docs/data.md)."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uservalue.config import SyntheticSource
from uservalue.data.sources.writer import write_events_in_order
from uservalue.io import atomic_dir, write_json
from uservalue.schema import EVENTS_SCHEMA, EVENTS_TEXT_SCHEMA, PURCHASE

USERS_PER_BLOCK = 1000
AFFINITY_STREAM = 0xAFF
MIX_CONCENTRATION = 8.0  # how far a user's behaviour mix strays from the global one
PREFERRED_CATEGORY_SHARES = np.array([0.6, 0.3, 0.1])
PRICE_NOISE_SIGMA = 0.2
TITLE_STREAM = 0x717  # the titles' own random stream (issue 23): titles off, nothing else changes
# Title vocabulary: the first words carry the planted value (data.synthetic.titles.value_words of them).
TITLE_WORDS: tuple[str, ...] = (
    "premium", "luxury", "deluxe", "designer", "handcrafted", "gold", "silk", "professional", "limited", "signature",
    "basic", "plastic", "cotton", "mug", "scarf", "lamp", "chair", "table", "cable", "charger", "notebook", "pencil",
    "bottle", "towel", "pillow", "blanket", "socks", "shirt", "jacket", "shoes", "bag", "wallet", "watch", "phone",
    "case", "cover", "stand", "holder", "box", "basket", "bowl", "plate", "cup", "spoon", "knife", "pan", "pot",
    "kettle", "clock", "mirror", "rug", "curtain", "candle", "frame", "poster", "sticker", "toy", "puzzle", "ball",
    "brush", "comb", "soap", "shampoo", "cream", "red", "blue", "green", "black", "white", "small", "large",
    "round", "square", "soft", "light", "compact", "classic", "simple", "everyday", "travel", "kitchen", "garden",
)


@dataclass(frozen=True)
class GenerateResult:
    events: int
    users: int
    out: Path
    truth_dir: Path


def _seasonality(days: int, start: dt.date) -> np.ndarray:
    """Relative daily intensity (mean 1): a yearly wave and a weekend bump."""
    day = np.arange(days, dtype=np.float64)
    ordinal = start.toordinal() + day
    yearly = 0.25 * np.sin(2 * np.pi * (ordinal % 365.25) / 365.25)
    weekday = (ordinal + 6) % 7  # 0 = Monday for proleptic ordinals (0001-01-01 was a Monday)
    weekend = np.where(weekday >= 5, 0.15, -0.06)
    season = 1.0 + yearly + weekend
    return season / season.mean()


def _drifted_mix(cfg: SyntheticSource) -> dict[str, float]:
    mix = dict(cfg.behavior_mix)
    for name in mix:
        mix[name] *= (1 + cfg.drift) if name == "view" else (1 - 0.6 * cfg.drift)
    total = sum(mix.values())
    return {name: share / total for name, share in mix.items()}


def _mean_active_days(cfg: SyntheticSource) -> float:
    """E[min(lifetime, days - birth)] for birth ~ U(0, days/2), lifetime ~ Exp(mean)."""
    m, days, b = cfg.mean_lifetime_days, float(cfg.days), cfg.days / 2
    return m - m * (m / b) * (math.exp(-(days - b) / m) - math.exp(-days / m))


class _Plan:
    """Everything shared by all blocks: calendar, prices, global mix."""

    def __init__(self, cfg: SyntheticSource, behaviors: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.kinds = tuple(cfg.behavior_mix)  # non-purchase behaviours, in params order
        unknown = set(self.kinds) - set(behaviors)
        if unknown:
            raise ValueError(f"synthetic behaviours {sorted(unknown)} are not in data.behaviors")
        self.mix = _drifted_mix(cfg)
        self.influence = np.array([cfg.influence[k] for k in self.kinds])
        self.season = _seasonality(cfg.days, cfg.start)
        self.season_cum = np.concatenate([[0.0], np.cumsum(self.season)])
        self.day_grid = np.arange(cfg.days + 1, dtype=np.float64)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xCA7]))
        self.category_price = np.round(rng.lognormal(math.log(15.0), 0.7, cfg.categories), 2)
        popularity = 1.0 / np.arange(1, cfg.categories + 1) ** 0.8
        self.category_popularity = popularity / popularity.sum()
        self.rate_per_day = cfg.events_per_user / _mean_active_days(cfg)
        self.start_us = int(
            dt.datetime.combine(cfg.start, dt.time(), tzinfo=dt.UTC).timestamp() * 1_000_000
        )
        self.id_width = len(str(max(cfg.users - 1, 1)))
        self.category_names = pc.cast(pa.array(np.arange(cfg.categories)), pa.string())
        # Favourite item ranks of each taste in each category (its own stream: affinity 0 changes nothing).
        self.favorites = _favorites(cfg)
        self.titles = _Titles(cfg) if cfg.titles is not None else None

    def cumulative(self, day: np.ndarray) -> np.ndarray:
        return np.interp(day, self.day_grid, self.season_cum)

    def user_ids(self, first: int, count: int) -> pa.Array:
        return pa.array([f"u{i:0{self.id_width}d}" for i in range(first, first + count)], pa.string())


def _block(plan: _Plan, block: int) -> tuple[pa.Table, pd.DataFrame]:
    cfg = plan.cfg
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, block]))
    first = block * USERS_PER_BLOCK
    n_users = min(USERS_PER_BLOCK, cfg.users - first)

    # --- users -----------------------------------------------------------------------
    activity = rng.gamma(1.0, 1.0, n_users)
    birth = rng.uniform(0, cfg.days / 2, n_users)
    end = np.minimum(birth + rng.exponential(cfg.mean_lifetime_days, n_users), cfg.days)
    global_mix = np.array([plan.mix[k] for k in plan.kinds])
    mix = rng.dirichlet(MIX_CONCENTRATION * global_mix, n_users)
    spend = rng.lognormal(0.0, 0.6, n_users) * (1 + cfg.drift)
    preferred = rng.choice(cfg.categories, size=(n_users, 3), p=plan.category_popularity)
    rate = plan.rate_per_day * activity

    # --- non-purchase events ---------------------------------------------------------
    cum_birth, cum_end = plan.cumulative(birth), plan.cumulative(end)
    counts = rng.poisson(rate * (cum_end - cum_birth))
    owner = np.repeat(np.arange(n_users), counts)
    position = rng.uniform(cum_birth[owner], cum_end[owner])
    day = np.interp(position, plan.season_cum, plan.day_grid)  # inverse CDF of the seasonality
    kind = (rng.random(owner.size)[:, None] > np.cumsum(mix, axis=1)[owner]).sum(axis=1)
    kind = np.minimum(kind, len(plan.kinds) - 1)
    slot = rng.choice(3, size=owner.size, p=PREFERRED_CATEGORY_SHARES)
    category = preferred[owner, slot]
    item_rank = (cfg.items_per_category * rng.random(owner.size) ** 2).astype(np.int64)
    taste = np.zeros(n_users, dtype=np.int64)
    if cfg.affinity > 0:  # drawn from a stream of its own, so the rest of the log is the same at any affinity
        own = np.random.default_rng(np.random.SeedSequence([cfg.seed, block, AFFINITY_STREAM]))
        taste = own.integers(0, cfg.tastes, n_users)
        liked = own.random(owner.size) < cfg.affinity
        pick = own.integers(0, plan.favorites.shape[2], owner.size)
        item_rank = np.where(liked, plan.favorites[taste[owner], category, pick], item_rank)
    item = category.astype(np.int64) * cfg.items_per_category + item_rank
    lean = np.zeros(n_users)
    convert_scale = price_scale = 1.0
    if plan.titles is not None:  # its own stream: the draws of everything else stay as they were
        lean, item = plan.titles.lean_towards_value(cfg, block, owner, category, item, spend, day, birth, end)
        convert_scale, price_scale = plan.titles.buy_scale[item], plan.titles.price_scale

    # --- purchases caused by them (the planted influence) ----------------------------
    converts = rng.random(owner.size) < plan.influence[kind] * convert_scale
    buy_day = day[converts] + rng.exponential(cfg.purchase_delay_days, int(converts.sum()))
    if plan.titles is not None and plan.titles.considers:  # value items bought later (titles.consider_days;
        # a purchase after the user's end is lost, so the other purchases' price noise is drawn anew)
        buy_day = buy_day + plan.titles.consider_delay(cfg, block, item[converts])
    keep = buy_day < end[owner[converts]]
    buy_owner = owner[converts][keep]
    buy_day = buy_day[keep]
    buy_category = category[converts][keep]
    buy_item = item[converts][keep]
    price_noise = rng.lognormal(0.0, PRICE_NOISE_SIGMA, buy_owner.size)
    buy_amount = plan.category_price[buy_category] * spend[buy_owner] * price_noise
    if plan.titles is not None:
        buy_amount = buy_amount * price_scale[buy_item]
    buy_amount = np.round(buy_amount, 2)

    # --- one sorted table ------------------------------------------------------------
    behavior_names = pa.array([*plan.kinds, PURCHASE], pa.string())
    all_owner = np.concatenate([owner, buy_owner])
    all_day = np.concatenate([day, buy_day])
    all_kind = np.concatenate([kind, np.full(buy_owner.size, len(plan.kinds))])
    all_category = np.concatenate([category, buy_category])
    all_item = np.concatenate([item, buy_item])
    all_amount = np.concatenate([np.zeros(owner.size), buy_amount])
    order = np.lexsort((all_day, all_owner))
    # Whole seconds, like the Taobao log.
    ts = plan.start_us + (all_day[order] * 86_400).astype(np.int64) * 1_000_000
    columns = [
        plan.user_ids(first, n_users).take(pa.array(all_owner[order])),
        pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        behavior_names.take(pa.array(all_kind[order])),
        pc.cast(pa.array(all_item[order]), pa.string()),
        plan.category_names.take(pa.array(all_category[order])),
        pa.array(np.ones(order.size)),
        pa.array(all_amount[order]),
    ]
    if plan.titles is not None:
        columns.append(plan.titles.texts.take(pa.array(all_item[order])))
    table = pa.Table.from_arrays(columns, schema=EVENTS_SCHEMA if plan.titles is None else EVENTS_TEXT_SCHEMA)

    mean_order_value = (
        spend
        * (plan.category_price[preferred] * PREFERRED_CATEGORY_SHARES).sum(axis=1)
        * math.exp(PRICE_NOISE_SIGMA**2 / 2)
    )
    truth = pd.DataFrame(
        {
            "user_id": plan.user_ids(first, n_users).to_pylist(),
            "birth_day": birth,
            "end_day": end,
            "events_per_day": rate,
            "buys_per_day": rate * (mix * plan.influence).sum(axis=1),
            "mean_order_value": mean_order_value,
            **{f"mix_{k}": mix[:, i] for i, k in enumerate(plan.kinds)},
            **({"taste": taste, **{f"category_{slot}": preferred[:, slot] for slot in range(3)}}
               if cfg.affinity > 0 else {}),
            **({"title_lean": lean} if plan.titles is not None else {}),
        }
    )
    return table, truth


class _Titles:
    """Item titles with planted value (data.synthetic.titles): each item's title is words_per_title distinct
    words of the vocabulary's first `words`; `value[i]` counts its value words (the vocabulary's first
    value_words), which scale its price by exp(price_effect * value) and its purchase propensity by
    exp(buy_effect * value). A user moves a share `lean` of their events to value items of the same category,
    drawn uniformly (so each is rare); `lean` grows with the user's latent spend level (up to titles.lean), so
    the text of what a user looked at tells their value even before they buy."""

    def __init__(self, cfg: SyntheticSource) -> None:
        titles = cfg.titles
        assert titles is not None
        if titles.words > len(TITLE_WORDS) or titles.words_per_title > titles.words:
            raise ValueError(f"data.synthetic.titles: at most {len(TITLE_WORDS)} words, and at least "
                             f"words_per_title ({titles.words_per_title})")
        n_items = cfg.categories * cfg.items_per_category
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, TITLE_STREAM]))
        words = np.argsort(rng.random((n_items, titles.words)), axis=1)[:, :titles.words_per_title]
        vocabulary = np.array(TITLE_WORDS[:titles.words], dtype=object)
        self.value = (words < titles.value_words).sum(axis=1)
        self.texts = pa.array([" ".join(row) for row in vocabulary[words]], pa.string())
        self.price_scale = np.exp(titles.price_effect * self.value)
        self.buy_scale = np.exp(titles.buy_effect * self.value)
        # Per category: its value items (ids), for the users' lean.
        ranks = self.value.reshape(cfg.categories, cfg.items_per_category) > 0
        self.value_counts = ranks.sum(axis=1)
        # value_ranks[c, j]: the rank of category c's j-th value item (j < value_counts[c]; padded after).
        self.value_ranks = np.argsort(~ranks, axis=1, kind="stable")
        self.value_words = [str(w) for w in vocabulary[:titles.value_words]]
        self.considers = titles.consider_days > 0

    def consider_delay(self, cfg: SyntheticSource, block: int, bought: np.ndarray) -> np.ndarray:
        """Extra days before each purchase of `bought` items: exponential, mean consider_days per value word."""
        assert cfg.titles is not None
        own = np.random.default_rng(np.random.SeedSequence([cfg.seed, block, TITLE_STREAM, 2]))
        return own.exponential(1.0, bought.size) * cfg.titles.consider_days * self.value[bought]

    def lean_towards_value(self, cfg: SyntheticSource, block: int, owner: np.ndarray, category: np.ndarray,
                           item: np.ndarray, spend: np.ndarray, day: np.ndarray, birth: np.ndarray,
                           end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each user's lean, the events' items with the leaning ones moved to a value item of their category;
        with titles.onset only the events from the user's onset day on)."""
        assert cfg.titles is not None
        own = np.random.default_rng(np.random.SeedSequence([cfg.seed, block, TITLE_STREAM]))
        # log(spend) ~ N(log(1 + drift), 0.6): +-1 sigma spans most of [0, titles.lean]; a little noise of its own.
        level = 0.5 + (np.log(spend) - math.log1p(cfg.drift)) / 1.2 + own.normal(0, 0.1, spend.size)
        share = cfg.titles.lean_from_spend
        if share < 1:  # the rest independent of spend (a stream of its own: share 1 draws nothing more)
            free = np.random.default_rng(np.random.SeedSequence([cfg.seed, block, TITLE_STREAM, 1]))
            level = share * level + (1 - share) * free.random(spend.size)
        lean = cfg.titles.lean * np.clip(level, 0.0, 1.0)
        moved = (own.random(owner.size) < lean[owner]) & (self.value_counts[category] > 0)
        slot = (own.random(owner.size) * self.value_counts[category]).astype(np.int64)
        if cfg.titles.onset:  # a stream of its own: without onset nothing more is drawn
            starts = np.random.default_rng(np.random.SeedSequence([cfg.seed, block, TITLE_STREAM, 3]))
            onset = birth + starts.random(birth.size) * (end - birth)
            moved &= day >= onset[owner]
        chosen = category.astype(np.int64) * cfg.items_per_category + self.value_ranks[category, slot]
        return lean, np.where(moved, chosen, item)


def _favorites(cfg: SyntheticSource) -> np.ndarray:
    """[taste, category, j] -> the rank (within the category) of the taste's j-th favourite item; chosen
    uniformly, not by popularity, so that they are something to learn beyond it."""
    n = min(cfg.favorites_per_category, cfg.items_per_category)
    if cfg.affinity <= 0:
        return np.zeros((cfg.tastes, cfg.categories, n), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, AFFINITY_STREAM]))
    keys = rng.random((cfg.tastes, cfg.categories, cfg.items_per_category))
    return np.argpartition(keys, n - 1, axis=2)[:, :, :n].astype(np.int64)


def _blocks(plan: _Plan, truth_frames: list[pd.DataFrame]) -> Iterator[pa.Table]:
    pending: list[pa.Table] = []
    pending_rows = 0
    for block in range(math.ceil(plan.cfg.users / USERS_PER_BLOCK)):
        table, truth = _block(plan, block)
        truth_frames.append(truth)
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= plan.cfg.chunk_events:
            yield pa.concat_tables(pending)
            pending, pending_rows = [], 0
    if pending:
        yield pa.concat_tables(pending)


def generate(
    cfg: SyntheticSource,
    out: str | Path,
    truth_dir: str | Path,
    behaviors: tuple[str, ...] = ("view", "fav", "cart", "buy"),
    progress: object | None = None,
) -> GenerateResult:
    """Write the synthetic log to `out` and its planted truth to `truth_dir` (both atomically)."""
    plan = _Plan(cfg, behaviors)
    truth_frames: list[pd.DataFrame] = []
    tables = _blocks(plan, truth_frames)
    if progress is not None:
        tables = progress(tables)  # type: ignore[operator]
    events = write_events_in_order(tables, out)
    with atomic_dir(truth_dir) as tmp:
        pq.write_table(
            pa.Table.from_pandas(pd.concat(truth_frames, ignore_index=True), preserve_index=False),
            tmp / "users.parquet",
        )
        if cfg.affinity > 0:
            t, c, j = np.indices(plan.favorites.shape).reshape(3, -1)
            pq.write_table(pa.table({"taste": t, "category_id": c,
                                     "item_rank": plan.favorites[t, c, j]}), tmp / "favorites.parquet")
        write_json(
            tmp / "truth.json",
            {
                "source": "synthetic",
                "planted": True,
                "params": cfg.model_dump(mode="json"),
                "behavior_mix": plan.mix,
                # Expected purchases caused by one event of each behaviour.
                "influence": dict(cfg.influence),
                # P(item | event) = share(category) * (affinity * [favourite]/favourites + (1 - affinity) * pop(rank)),
                # pop(rank) = sqrt((rank+1)/n) - sqrt(rank/n); see affinity_scores.
                "affinity": {"strength": cfg.affinity, "tastes": cfg.tastes,
                             "favorites_per_category": int(plan.favorites.shape[2]),
                             "items_per_category": cfg.items_per_category,
                             "category_shares": PREFERRED_CATEGORY_SHARES.tolist()},
                # Item titles (issue 23): null when off. users.parquet's buys_per_day and mean_order_value leave
                # out their effects (a user's title_lean is there).
                "titles": None if plan.titles is None else {
                    **cfg.titles.model_dump(mode="json"), "value_word_list": plan.titles.value_words,
                    "value_items": int((plan.titles.value > 0).sum())},
                "seasonality": plan.season.round(6).tolist(),
                "start": cfg.start.isoformat(),
                "events": events,
            },
        )
    return GenerateResult(events, cfg.users, Path(out), Path(truth_dir))


def expected_value(truth_dir: str | Path, cutoff: dt.datetime, horizon_days: float) -> pd.DataFrame:
    """Each user's planted expected spend in [cutoff, cutoff + horizon) given their latent state.

    Uses the user's true lifetime, so it is the value an oracle would predict; purchase delays
    that straddle the window's edges are ignored (they are days against a months-long horizon).
    """
    truth_dir = Path(truth_dir)
    meta = json.loads((truth_dir / "truth.json").read_text())
    users = pd.read_parquet(truth_dir / "users.parquet")
    season = np.asarray(meta["seasonality"])
    cumulative = np.concatenate([[0.0], np.cumsum(season)])
    grid = np.arange(season.size + 1, dtype=np.float64)
    start = dt.datetime.fromisoformat(meta["start"]).replace(tzinfo=dt.UTC)
    lo_day = (cutoff - start).total_seconds() / 86400
    lo = np.clip(np.maximum(lo_day, users["birth_day"]), 0, season.size)
    hi = np.clip(np.minimum(lo_day + horizon_days, users["end_day"]), 0, season.size)
    exposure = np.clip(np.interp(hi, grid, cumulative) - np.interp(lo, grid, cumulative), 0, None)
    return pd.DataFrame(
        {
            "user_id": users["user_id"],
            "expected_buys": users["buys_per_day"] * exposure,
            "expected_value": users["buys_per_day"] * exposure * users["mean_order_value"],
        }
    )


def affinity_scores(truth_dir: str | Path, user_ids: Sequence[str], k: int,
                    exclude: dict[str, set[str]] | None = None) -> dict[str, list[tuple[str, float]]]:
    """The planted truth's own top-k items of each user: (item id, P(item | one event of the user)), highest
    first, without the user's `exclude` items; a user the truth does not know gets no list."""
    truth_dir = Path(truth_dir)
    meta = json.loads((truth_dir / "truth.json").read_text())
    planted = meta.get("affinity") or {}
    if not planted.get("strength"):
        raise ValueError(f"{truth_dir}: the log was generated without affinity (data.synthetic.affinity: 0)")
    users = pd.read_parquet(truth_dir / "users.parquet").set_index("user_id")
    favorites = pd.read_parquet(truth_dir / "favorites.parquet")
    n_items, n_fav, strength = planted["items_per_category"], planted["favorites_per_category"], planted["strength"]
    shares = np.asarray(planted["category_shares"])
    fav = np.zeros((int(favorites["taste"].max()) + 1, int(favorites["category_id"].max()) + 1, n_fav), np.int64)
    order = favorites.groupby(["taste", "category_id"]).cumcount().to_numpy()
    fav[favorites["taste"], favorites["category_id"], order] = favorites["item_rank"]
    ranks = np.arange(n_items)
    popularity = (1 - strength) * (np.sqrt((ranks + 1) / n_items) - np.sqrt(ranks / n_items))
    exclude = exclude or {}
    out: dict[str, list[tuple[str, float]]] = {}
    for user in user_ids:
        if user not in users.index:
            continue
        row = users.loc[user]
        scores: dict[str, float] = {}
        for slot, share in enumerate(shares):
            category = int(row[f"category_{slot}"])
            p = popularity.copy()
            np.add.at(p, fav[int(row["taste"]), category], strength / n_fav)
            for rank, value in zip(ranks, share * p, strict=True):
                item = str(category * n_items + rank)
                scores[item] = scores.get(item, 0.0) + float(value)
        banned = exclude.get(user, set())
        ranked = sorted(((i, v) for i, v in scores.items() if i not in banned), key=lambda iv: (-iv[1], iv[0]))
        out[user] = ranked[:k]
    return out
