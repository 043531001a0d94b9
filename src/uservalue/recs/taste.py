"""A user-taste recommender shaped like the way people shop: a user spreads their events over a few
categories, and within a category picks items by a taste shared with other users (their favourites) or by
the category's popularity.

    P(item | user) = P(category | user) * P(item | category, user)
    P(category | user) = (n_uc + alpha * P(category)) / (n_u + alpha)
    P(item | category, user) = (n_ui + gamma * sum_t P(t | user) P(item | category, t)) / (n_uc + gamma)

n are the user's behaviour- and recency-weighted event counts. The taste groups t are a mixture of
multinomials fitted by EM over all users' events before the cutoff (one taste per user, shared favourites
per category, each taste's distribution smoothed by `beta` pseudo-events towards the category's popularity);
a user's P(t | user) is the posterior given their own events, so a taste seen in one category tells which
items to expect in the user's other categories. `gamma` weighs that taste prior against the user's own
items in the category (a user who returned to an item keeps it). Closed form plus a few EM steps: no
gradient descent, seconds at 10^4 users."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from uservalue.recs.base import FitOptions, Histories, Recommender
from uservalue.recs.baselines import similarity, user_item_matrix
from uservalue.schema import DEFAULT_BEHAVIORS

DEFAULT_BEHAVIOR_WEIGHTS = {"view": 1.0, "fav": 1.0, "cart": 1.0, "buy": 1.0}


class TasteModel(Recommender):
    kind = "taste"

    def __init__(self, tastes: int = 20, iterations: int = 100, alpha: float = 0.1, beta: float = 30.0,
                 gamma: float = 300.0, behavior_weights: dict[str, float] | None = None,
                 half_life_days: float | None = None, cooccurrence: float = 0.0, neighbors: int = 100,
                 history: int = 50, **params: object) -> None:
        if tastes < 1 or iterations < 0 or min(alpha, beta, gamma) < 0:
            raise ValueError(f"taste: tastes ({tastes}) >= 1, iterations ({iterations}) >= 0 and alpha, beta, gamma "
                             f"({alpha}, {beta}, {gamma}) >= 0 expected")
        weights = {**DEFAULT_BEHAVIOR_WEIGHTS, **(behavior_weights or {})}
        super().__init__(tastes=tastes, iterations=iterations, alpha=alpha, beta=beta, gamma=gamma,
                         behavior_weights=weights, half_life_days=half_life_days, cooccurrence=cooccurrence,
                         neighbors=neighbors, history=history, **params)
        self.similar: sp.csr_matrix | None = None
        self.log_taste_item = np.zeros((0, 0), np.float32)  # (tastes, items): log P(item | its category, taste)
        self.taste_item = np.zeros((0, 0), np.float32)
        self.log_prior = np.zeros(0, np.float32)  # log P(taste)
        self.category_share = np.zeros(0, np.float32)  # P(category), the last entry: items without one
        self.reference_time: float | None = None  # the cutoff (recency weights count back from it)

    # -- the users x items weighted counts ---------------------------------------------------
    def _item_category(self) -> np.ndarray:
        ic = self.item_category.astype(np.int64).copy()
        ic[ic < 0] = len(self.categories)  # one bucket for items without a category
        return ic

    def _counts(self, histories: Histories, users: np.ndarray) -> sp.csr_matrix:
        weights = np.array([float(self.params["behavior_weights"].get(b, 1.0)) for b in DEFAULT_BEHAVIORS] + [1.0])
        rows, cols, vals = [], [], []
        half_life = self.params.get("half_life_days")
        for row, user in enumerate(users):
            span = histories.user_slice(int(user))
            item = histories.item[span]
            known = item >= 0
            w = weights[histories.behavior[span][known]]  # index -1 (another behaviour): weight 1
            if half_life:
                last = float(histories.t[span].max()) if len(item) else 0.0
                now = last if self.reference_time is None else max(self.reference_time, last)
                age_days = np.maximum(now - histories.t[span][known], 0) / 86_400
                w = w * np.power(0.5, age_days / float(half_life))
            rows.append(np.full(int(known.sum()), row))
            cols.append(item[known])
            vals.append(w)
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return sp.csr_matrix((np.concatenate(vals) if vals else np.zeros(0), (r, np.concatenate(cols) if cols else r)),
                             shape=(len(users), len(self.catalog)), dtype=np.float64)

    # -- fit ---------------------------------------------------------------------------------
    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        self.reference_time = cutoff.timestamp()
        x = self._counts(histories, np.arange(len(histories.users)))
        ic = self._item_category()
        n_categories = len(self.categories) + 1
        item_total = np.asarray(x.sum(axis=0)).ravel()
        category_total = np.bincount(ic, weights=item_total, minlength=n_categories)
        self.category_share = (category_total / max(category_total.sum(), 1e-12)).astype(np.float32)
        # The category's popularity: the smoothing every taste shrinks to (a pseudo-count keeps unseen items > 0).
        within = (item_total + 0.1) / (category_total[ic] + 0.1 * np.bincount(ic, minlength=n_categories)[ic])
        n_tastes = max(1, min(int(self.params["tastes"]), len(histories.users)))
        beta = float(self.params["beta"])
        rng = np.random.default_rng(options.seed)
        resp = np.eye(n_tastes)[rng.integers(0, n_tastes, len(histories.users))]  # a random hard start
        log_likelihood, xt = float("nan"), x.T.tocsr()
        for step in range(int(self.params["iterations"]) + 1):
            taste_counts = np.asarray((xt @ resp).T)  # (tastes, items)
            taste_category = np.stack([np.bincount(ic, weights=row, minlength=n_categories) for row in taste_counts])
            taste_item = (taste_counts + beta * within) / (taste_category[:, ic] + beta)
            log_taste_item = np.log(taste_item)
            log_prior = np.log(resp.sum(axis=0) + 1e-3) - np.log(resp.sum() + 1e-3 * n_tastes)
            if step == int(self.params["iterations"]):
                break
            joint = _leave_one_out(x, ic, n_categories, resp, taste_counts, taste_category, beta * within, beta) \
                + log_prior
            top = joint.max(axis=1, keepdims=True)
            resp = np.exp(joint - top)
            norm = resp.sum(axis=1, keepdims=True)
            resp /= norm
            log_likelihood = float((top.ravel() + np.log(norm.ravel())).sum() / max(x.sum(), 1e-12))
            if options.log_metrics is not None:
                options.log_metrics({"recs_taste_log_likelihood": log_likelihood}, step)
        self.taste_item = taste_item.astype(np.float32)
        if float(self.params["cooccurrence"]) > 0:
            self.similar = similarity(histories, len(self.catalog), int(self.params["neighbors"]),
                                      int(self.params["history"]))
        self.log_taste_item = log_taste_item.astype(np.float32)
        self.log_prior = log_prior.astype(np.float32)
        return {"tastes": float(n_tastes), "log_likelihood_per_event": log_likelihood,
                "mean_max_taste_posterior": float(resp.max(axis=1).mean())}

    # -- score -------------------------------------------------------------------------------
    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        x = self._counts(histories, users)
        ic = self._item_category()
        n_categories = len(self.category_share)
        joint = np.asarray(x @ self.log_taste_item.T.astype(np.float64)) + self.log_prior
        resp = np.exp(joint - joint.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        prior_items = resp @ self.taste_item  # (users, items): sum_t P(t | user) P(item | category, t)
        rho = float(self.params["cooccurrence"])
        if rho > 0 and self.similar is not None:
            near = np.asarray((user_item_matrix(histories, users, len(self.catalog), int(self.params["history"]))
                               @ self.similar).todense(), dtype=np.float64)
            near_category = np.stack([np.bincount(ic, weights=row, minlength=n_categories) for row in near]) \
                if len(near) else np.zeros((0, n_categories))
            has = near_category[:, ic] > 0
            near = np.where(has, near / np.where(has, near_category[:, ic], 1.0), prior_items)
            prior_items = (1 - rho) * prior_items + rho * near
        dense = x.toarray()
        user_category = np.stack([np.bincount(ic, weights=row, minlength=n_categories) for row in dense]) \
            if len(dense) else np.zeros((0, n_categories))
        alpha, gamma = float(self.params["alpha"]), float(self.params["gamma"])
        p_category = (user_category + alpha * self.category_share) / (user_category.sum(axis=1, keepdims=True) + alpha)
        p_within = (dense + gamma * prior_items) / (user_category[:, ic] + gamma)
        return (p_category[:, ic] * p_within).astype(np.float32)

    # -- save / load -------------------------------------------------------------------------
    def _save_state(self, path: Path) -> None:
        np.save(path / "taste_item.npy", self.taste_item, allow_pickle=False)
        if self.similar is not None:
            sp.save_npz(path / "similar.npz", self.similar)
        np.save(path / "taste_prior.npy", self.log_prior, allow_pickle=False)
        np.save(path / "category_share.npy", self.category_share, allow_pickle=False)
        np.save(path / "reference_time.npy", np.array([np.nan if self.reference_time is None else self.reference_time]),
                allow_pickle=False)

    def _load_state(self, path: Path) -> None:
        self.similar = sp.load_npz(path / "similar.npz").tocsr() if (path / "similar.npz").is_file() else None
        self.taste_item = np.load(path / "taste_item.npy", allow_pickle=False)
        self.log_taste_item = np.log(self.taste_item)
        self.log_prior = np.load(path / "taste_prior.npy", allow_pickle=False)
        self.category_share = np.load(path / "category_share.npy", allow_pickle=False)
        reference = float(np.load(path / "reference_time.npy", allow_pickle=False)[0])
        self.reference_time = None if np.isnan(reference) else reference


def _leave_one_out(x: sp.csr_matrix, ic: np.ndarray, n_categories: int, resp: np.ndarray, taste_counts: np.ndarray,
                   taste_category: np.ndarray, pseudo: np.ndarray, beta: float) -> np.ndarray:
    """(users, tastes) log P(user's events | taste) with each taste's counts less the user's own share of them:
    a user's own events would otherwise pull them back to whatever taste they started in (each taste holds few
    users of a category)."""
    coo = x.tocoo()
    u, i, v = coo.row, coo.col, coo.data
    per_category = sp.csr_matrix((v, (u, ic[i])), shape=(x.shape[0], n_categories)).tocoo()
    cu, cc, cv = per_category.row, per_category.col, per_category.data
    out = np.zeros((x.shape[0], resp.shape[1]))
    for t in range(resp.shape[1]):
        own = resp[u, t] * v
        item_term = v * np.log(np.maximum(taste_counts[t, i] - own, 0) + pseudo[i])
        category_term = cv * np.log(np.maximum(taste_category[t, cc] - resp[cu, t] * cv, 0) + beta)
        out[:, t] = np.bincount(u, weights=item_term, minlength=x.shape[0]) \
            - np.bincount(cu, weights=category_term, minlength=x.shape[0])
    return out
