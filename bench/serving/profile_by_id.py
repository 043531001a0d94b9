"""Where one by-id /predict request's time goes in the service's worker code, phase by phase (issue 15).

    python bench/serving/profile_by_id.py [--project DIR] [--repeats 2000] [--users 1]

Loads the packaged champion and the online store as the service does (`load_packaged_model`,
`open_configured_store`, `Scorer`), then runs what one request costs inside the worker, without HTTP,
`--repeats` times, timing each phase with perf_counter: BentoML's input parsing (the route's pydantic
model from the JSON body), the scorer's request validation (`prepare`), the store read, the online
features, the model (prediction + exact Shapley shares, split into building the coalition rows, the
model input, the forward pass and the rest), the answer body, BentoML's output encoding (its root
model's `model_dump_json`, as `to_http_response` does), and the prediction log's rows (built after the
answer is sent); then the whole request through `BatchingPredictor.predict` on an event loop, a lone
request scored on the loop (as served) and handed to the scoring thread. Prints the median and p90 of each phase in microseconds, and the whole path as
`Scorer.score_batch` + `answers` runs it (the sum of phases differs from it by the timers' own cost).
Nothing is asserted; figures go to bench/out/profile_by_id.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
AS_OF = "1998-07-01T00:00:00Z"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=REPO, help="project root after `make run` (default: this one)")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--users", type=int, default=1, help="user ids per request")
    args = parser.parse_args()
    root = args.project.resolve()
    record = json.loads((root / "reports" / "package.json").read_text())
    os.environ["BENTOML_HOME"] = str(root / record["bentoml_home"])
    os.environ["USERVALUE_PROJECT_DIR"] = str(root)
    os.chdir(root)

    import bentoml
    import duckdb
    import torch
    from _bentoml_sdk.io_models import IODescriptor

    from uservalue.features.online import FeatureArrays, concat, online_arrays
    from uservalue.models import influence
    from uservalue.models.deep.data import as_batch, batch_arrays
    from uservalue.models.deep.model import TorchValueModel
    from uservalue.serving.bento_model import load_packaged_model
    from uservalue.serving.requests import PredictRequest
    from uservalue.serving.scorer import Scorer, _keyed, _split_keys
    from uservalue.serving.settings import open_configured_store, serve_settings

    model, info, _ = load_packaged_model(bentoml.models.get(record["bento_model"]))
    store = open_configured_store(serve_settings())
    scorer = Scorer(model, info, max_events=100_000, max_users=10_000, store=store)
    path = root / "data" / "validated.parquet"
    users = [r[0] for r in duckdb.sql(f"SELECT DISTINCT user_id FROM read_parquet('{path}') ORDER BY 1 "
                                      f"LIMIT {args.users}").fetchall()]
    body = json.dumps({"user_ids": users, "as_of": AS_OF}).encode()
    input_model = PredictRequest  # the route's input_spec

    def route() -> dict[str, Any]: ...

    output_model = IODescriptor.from_output(route)  # the route's `-> dict[str, Any]` root model
    deep = isinstance(model, TorchValueModel)

    phases: dict[str, list[float]] = defaultdict(list)
    whole: list[float] = []

    def timed(name: str, started: float) -> float:
        now = time.perf_counter()
        phases[name].append((now - started) * 1e6)
        return now

    for _ in range(args.repeats):
        t = time.perf_counter()
        request_model = input_model.model_validate_json(body)
        t = timed("1 parse+validate body (pydantic)", t)
        request = scorer.prepare(request_model.events, request_model.as_of, request_model.user_ids)
        t = timed("2 scorer.prepare", t)
        stored, _unknown = store.get(list(request.user_ids))
        t = timed("3 store.get (read + decode)", t)
        events = concat([_keyed(stored, 0)])
        t = timed("4 key the events", t)
        features = FeatureArrays.concat([online_arrays(events, request.as_of, model.spec)])
        t = timed("5 online features", t)
        _position, user_id = _split_keys(features.user_id)
        features = features.with_user_ids(user_id)
        t = timed("6 split keys", t)
        # The rows influence.shapley_values scores: each user once per coalition of its non-null behaviours.
        k = len(model.spec.behaviors)
        bits = 1 << np.arange(k, dtype=np.int64)
        mask = np.array([int(bits[list(kept)].sum()) for kept in influence._coalitions(k)], dtype=np.int64)
        players = (~influence.null_players(features)).astype(np.int64) @ bits
        coalition, row = np.nonzero((mask[:, None] & ~players[None, :]) == 0)
        rows = influence._occluded_copies(features, row, (mask[coalition, None] & bits[None, :]) == 0)
        t = timed("7a model: coalition rows", t)
        if deep:
            arrays = batch_arrays(rows, model.feature_columns, model.spec.sequence_length,
                                  user_buckets=model.user_buckets)
            tensors = as_batch(arrays, model.device)
            t = timed("7b model: input arrays + tensors", t)
            forward = model._serving_forward(arrays)
            with torch.inference_mode():
                raw = forward(tensors)
                t = timed("7c model: forward", t)
                from uservalue.models.deep import ziln

                lp = ziln.log_p_buy(raw, model.horizon_days)
                ziln.log_expected_value(raw, model.horizon_days, log_p=lp)
            t = timed("7d model: ZILN outputs", t)
        else:
            model.predict_outputs(rows)
            t = timed("7c model: predict_outputs", t)
        model.predict_arrays(features)  # 7a-7d plus the Shapley weights and shares
        t = timed("7 model: predict_arrays (whole)", t)
        batch = scorer.score_batch([request])
        t = timed("8 score_batch (3-7 in one)", t)
        answers = scorer.answers(batch)
        t = timed("9 answers", t)
        output_model(answers[0]).model_dump_json()
        t = timed("10 output encoding (BentoML root model)", t)
        scorer.log_frame(batch)
        timed("11 prediction log frame (after the answer)", t)
        started = time.perf_counter()
        scorer.answers(scorer.score_batch([scorer.prepare([], request_model.as_of, users)]))
        whole.append((time.perf_counter() - started) * 1e6)

    # The service's request path around score_batch: BatchingPredictor.predict awaited on an event loop, a
    # lone request scored on the loop itself (as served) and, for comparison, handed to the scoring thread.
    import asyncio
    import tempfile

    from uservalue.serving import batching
    from uservalue.serving.prediction_log import PredictionLog

    as_of = PredictRequest.model_validate_json(body).as_of
    loop = asyncio.new_event_loop()
    through: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        predictor = batching.BatchingPredictor(scorer, PredictionLog(Path(log_dir)))
        inline_max_users = batching.INLINE_MAX_USERS
        for label, limit in (("on the loop", inline_max_users), ("via the scoring thread", -1)):
            batching.INLINE_MAX_USERS = limit
            times = through.setdefault(f"BatchingPredictor.predict ({label})", [])
            for _ in range(args.repeats):
                started = time.perf_counter()
                loop.run_until_complete(predictor.predict([], as_of, users))
                times.append((time.perf_counter() - started) * 1e6)
        batching.INLINE_MAX_USERS = inline_max_users
        predictor.close()
    loop.close()

    skip = args.repeats // 10  # warm-up
    out = {name: {"p50_us": statistics.median(v[skip:]), "p90_us": float(np.percentile(v[skip:], 90))}
           for name, v in sorted(phases.items(), key=lambda kv: int(kv[0].split()[0].rstrip("abcd")))}
    out["prepare + score_batch + answers"] = {"p50_us": statistics.median(whole[skip:]),
                                              "p90_us": float(np.percentile(whole[skip:], 90))}
    for name, times in through.items():
        out[name] = {"p50_us": statistics.median(times[skip:]), "p90_us": float(np.percentile(times[skip:], 90))}
    meta = {"when": dt.datetime.now(dt.UTC).isoformat(), "model_type": info.model_type, "users": len(users),
            "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
            "traced": getattr(model, "serving_is_traced", None), "load_average": os.getloadavg()}
    print(json.dumps(meta))
    for name, row in out.items():
        print(f"{name:48s} p50 {row['p50_us']:9.1f} us   p90 {row['p90_us']:9.1f} us")
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / "profile_by_id.json").write_text(json.dumps({**meta, "phases": out}, indent=2) + "\n")
    store.close()


if __name__ == "__main__":
    main()
