"""Serving benchmark: batch scoring of 10^5 users, and the live service with 1 and 8 concurrent clients.

Run from the project root after `make run` (it serves the Bento the package stage built, and the
online store the materialize stage wrote):

    python bench/serve.py [--seconds 30] [--clients 1 8] [--users 100000] [--project DIR]

First the service's compute alone is timed in this process (`--compute`: score, log and answer
one request, no HTTP). Then three servers are measured one after another, in one run, with the
same client: a bare uvicorn ASGI app (the floor), a trivial BentoML service with the same input
type (BentoML's own cost) and the real service on three paths: one user by id (from the online store), one user by events (3
events sent), and 1,000 users by id in one request (1 client); and POST /recommend of one user by id, k=20 (1 client;
issue 18), when the Bento packages a recommender. The client runs on the same cores,
so the figures are comparable with each other, not with a dedicated load generator. Targets
(issue 15): by id p50 <= 2.5x and req/s >= 0.5x the trivial service's; by events p50 <= 4x and
req/s >= 0.35x; 1,000 ids p50 <= 100 ms. Printed and written to bench/out/serve.json, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PROJECT = ROOT  # the project whose Bento and online store are measured (--project)
BIN = Path(sys.executable).parent
REQUEST = {
    "events": [
        {"user_id": "bench-user", "ts": "1997-02-03T10:00:00Z", "behavior": "buy", "amount": 31.5, "quantity": 2},
        {"user_id": "bench-user", "ts": "1997-04-11T18:30:00Z", "behavior": "buy", "amount": 12.0},
        {"user_id": "bench-user", "ts": "1997-07-20T09:00:00Z", "behavior": "buy", "amount": 48.9, "quantity": 3},
    ],
    "as_of": "1997-10-01T00:00:00Z",
}
AS_OF = "1998-07-01T00:00:00Z"  # after the last CDNOW event: every stored user has history


def stored_users(n: int) -> list[str]:
    """The first n user ids of the validated events (the users the materialize stage stored)."""
    import duckdb

    path = PROJECT / "data" / "validated.parquet"
    return [row[0] for row in duckdb.sql(f"SELECT DISTINCT user_id FROM read_parquet('{path}') ORDER BY 1 LIMIT {n}")
            .fetchall()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(command: list[str], cwd: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command} exited with {process.returncode}")
        try:
            httpx.post(f"http://127.0.0.1:{port}/predict", json=REQUEST, timeout=5)
            return process
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"{command} did not start")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


async def _load(url: str, clients: int, seconds: float, request: dict = REQUEST) -> dict[str, float]:
    import aiohttp

    body = json.dumps(request).encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                answer = await response.read()
                if response.status != 200 or b'"errors"' in answer:  # a user not answered is an error too
                    errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "errors": errors, "rps": len(ms) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99))}


def bench_batch(users: int) -> dict[str, float]:
    from uservalue.config import SyntheticSource, load_params
    from uservalue.data.sources.synthetic import generate
    from uservalue.features.sql import build_features
    from uservalue.lifecycle.context import StageContext
    from uservalue.lifecycle.monitor import default_as_of
    from uservalue.lifecycle.registry import load_registered
    from uservalue.serving.scorer import score_features

    events = OUT / "train_sequence" / f"events_u{users}_e100.parquet"  # bench/train_sequence.py's log, if there
    if not events.is_file():
        events = OUT / "serve" / f"events_u{users}.parquet"
    if not events.is_file():
        generate(SyntheticSource(users=users, events_per_user=100, seed=0), events, events.parent / f"truth_u{users}")
    model, info = load_registered(StageContext(PROJECT, load_params(PROJECT / "params.yaml")))
    as_of = default_as_of(events)
    started = time.perf_counter()
    features = build_features(events, as_of, model.spec).to_pandas()
    featurized = time.perf_counter()
    scored = score_features(model, features)
    done = time.perf_counter()
    return {"users": len(scored), "model": info.model_type, "model_version": info.version,
            "features_s": featurized - started, "predict_and_influence_s": done - featurized,
            "total_s": done - started, "users_per_s": len(scored) / (done - started)}


def bench_compute(repeats: int) -> dict[str, dict[str, float]]:
    """The service's compute per request, in this process, without HTTP: Scorer.prepare and score_batch
    (store read, online features, model with influence) and answers, what a lone request waits for in
    BatchingPredictor (the prediction log's rows are built later, for many requests at once). Median and
    p90 ms over `repeats` calls per path (a tenth for 1,000 ids)."""
    import statistics

    import bentoml

    from uservalue.serving.bento_model import load_packaged_model
    from uservalue.serving.requests import Event
    from uservalue.serving.scorer import Scorer
    from uservalue.serving.settings import open_configured_store, serve_settings

    record = json.loads((PROJECT / "reports" / "package.json").read_text())
    os.environ.setdefault("BENTOML_HOME", str(PROJECT / record["bentoml_home"]))
    os.environ.setdefault("USERVALUE_PROJECT_DIR", str(PROJECT))
    model, info, _ = load_packaged_model(bentoml.models.get(record["bento_model"]))
    store = open_configured_store(serve_settings())
    scorer = Scorer(model, info, max_events=100_000, max_users=10_000, store=store)
    users = stored_users(1000)
    as_of = dt.datetime.fromisoformat(AS_OF)
    events = [Event.model_validate(e) for e in REQUEST["events"]]
    requests = {"by_id": ([], as_of, users[:1]), "by_events": (events, dt.datetime.fromisoformat(REQUEST["as_of"]), []),
                "by_id_1000": ([], as_of, users)}
    figures = {}
    try:
        for path, (sent, when, ids) in requests.items():
            times = []
            for _ in range(max(repeats // (10 if path == "by_id_1000" else 1), 5)):
                started = time.perf_counter()
                scorer.answers(scorer.score_batch([scorer.prepare(sent, when, ids)]))
                times.append((time.perf_counter() - started) * 1e3)
            times = times[len(times) // 10:]  # the first calls warm caches up
            figures[path] = {"p50_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}
    finally:
        store.close()
    return figures


SERVERS = ("bare_uvicorn", "trivial_bentoml", "uservalue_service")


def bench_paired(trivial_url: str, service_url: str, paths: dict[str, tuple[dict, list[int]]], seconds: float,
                 rounds: int) -> dict[str, dict[str, dict[str, object]]]:
    """Each path against the trivial service, both servers up, in `rounds` alternating rounds of
    seconds / rounds each (the trivial service first in even rounds): load that other work puts on
    shared cores then falls on both sides of each ratio. Per path and client count: the median over
    rounds of each server's p50 / p99 / req/s and of the per-round ratios, and every round."""
    out: dict[str, dict[str, dict[str, object]]] = {}
    for path, (body, counts) in paths.items():
        out[path] = {}
        for clients in counts:
            per_round = []
            for r in range(rounds):
                order = [("trivial", trivial_url, REQUEST), ("service", service_url, body)]
                runs = {name: asyncio.run(_load(url, clients, seconds / rounds, request))
                        for name, url, request in (order if r % 2 == 0 else order[::-1])}
                per_round.append({**runs, "p50_ratio": runs["service"]["p50_ms"] / runs["trivial"]["p50_ms"],
                                  "rps_ratio": runs["service"]["rps"] / runs["trivial"]["rps"]})
            out[path][f"{clients}_clients"] = {
                **{f"{name}_{k}": float(np.median([row[name][k] for row in per_round]))
                   for name in ("service", "trivial") for k in ("rps", "p50_ms", "p99_ms")},
                "p50_ratio": float(np.median([row["p50_ratio"] for row in per_round])),
                "rps_ratio": float(np.median([row["rps_ratio"] for row in per_round])),
                "rounds": per_round,
            }
            summary = {k: round(v, 3) for k, v in out[path][f"{clients}_clients"].items() if k != "rounds"}
            print(f"paired {path} {clients} clients: {summary}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8],
                        help="concurrent clients; one load run per value (1 = latency without queueing)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="which servers to load (the comparison needs trivial_bentoml and uservalue_service)")
    parser.add_argument("--no-batch", action="store_true", help="skip the 10^5-user batch scoring")
    parser.add_argument("--compute", type=int, default=300, metavar="N",
                        help="also time the service's compute per request in this process, N calls per path (0: skip)")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="instead of one server after the other: the service and the trivial service up "
                             "together, each path in ROUNDS alternating rounds (for cores shared with other work)")
    parser.add_argument("--project", type=Path, default=ROOT,
                        help="project root after `make run` whose Bento and online store are measured (default: this one)")
    args = parser.parse_args()
    global PROJECT
    PROJECT = args.project.resolve()
    if not (PROJECT / "reports" / "package.json").is_file():
        raise SystemExit("no built Bento: run `make run` first")

    package = json.loads((PROJECT / "reports" / "package.json").read_text())
    results: dict[str, object] = {"when": dt.datetime.now(dt.UTC).isoformat(), "cpus": os.cpu_count(),
                                  "project": str(PROJECT), "model_type": package.get("model_type"),
                                  "load_average": os.getloadavg(),
                                  "clients": args.clients, "seconds": args.seconds}
    if args.compute:
        results["compute"] = bench_compute(args.compute)
        print(f"compute: {results['compute']}", flush=True)
    if not args.no_batch:
        results["batch"] = bench_batch(args.users)
        print(f"batch: {results['batch']}", flush=True)

    servers = {
        "bare_uvicorn": lambda port: _start([str(BIN / "uvicorn"), "hello_app:app", "--port", str(port),
                                             "--log-level", "warning"], ROOT / "bench" / "serving", port),
        "trivial_bentoml": lambda port: _start([str(BIN / "bentoml"), "serve", "trivial_service:Trivial",
                                                "--host", "127.0.0.1", "--port", str(port)],
                                               ROOT / "bench" / "serving", port, {"BENTOML_DO_NOT_TRACK": "true"}),
        "uservalue_service": lambda port: _start([str(BIN / "uservalue"), "serve", "--port", str(port)], PROJECT, port,
                                                 {"USERVALUE_PREDICTION_LOG_DIR": str(OUT / "serve" / "prediction_log")}),
    }
    # The real service's paths: (request body, client counts).
    users = stored_users(1000)
    paths = {"by_id": ({"user_ids": users[:1], "as_of": AS_OF}, args.clients), "by_events": (REQUEST, args.clients),
             "by_id_1000": ({"user_ids": users, "as_of": AS_OF}, [1])}
    if args.paired:
        started: list[tuple[int, subprocess.Popen]] = []
        try:
            for name in ("trivial_bentoml", "uservalue_service"):
                port = _free_port()
                started.append((port, servers[name](port)))
            results["paired"] = bench_paired(*(f"http://127.0.0.1:{port}/predict" for port, _ in started),
                                             paths, args.seconds, args.paired)
        finally:
            for _, process in started:
                _stop(process)
        (OUT / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    for name, start in servers.items():
        if name not in args.servers:
            continue
        port = _free_port()
        process = start(port)
        url = f"http://127.0.0.1:{port}/predict"
        try:
            if name == "uservalue_service":
                results[name] = {path: {f"{c}_clients": asyncio.run(_load(url, c, args.seconds, body)) for c in counts}
                                 for path, (body, counts) in paths.items()}
                # Top-20 items of one stored user (issue 18), at one client: next to the trivial service's p50;
                # only when the Bento packages a recommender (CDNOW has no items: train_recs registers none).
                if package.get("recs_model"):
                    recommend = {"user_id": users[0], "k": 20, "as_of": AS_OF}
                    results[name]["recommend_by_id"] = {"1_clients": asyncio.run(_load(
                        url.removesuffix("/predict") + "/recommend", 1, args.seconds, recommend))}
            else:
                results[name] = {f"{c}_clients": asyncio.run(_load(url, c, args.seconds)) for c in args.clients}
        finally:
            _stop(process)
        print(f"{name}: {results[name]}", flush=True)
    if "uservalue_service" in results and "trivial_bentoml" in results:
        trivial = results["trivial_bentoml"]
        results["service_vs_trivial_bentoml"] = {
            path: {clients: {"p50_ratio": row["p50_ms"] / trivial[clients]["p50_ms"],
                             "p99_ratio": row["p99_ms"] / trivial[clients]["p99_ms"],
                             "rps_ratio": row["rps"] / trivial[clients]["rps"]}
                   for clients, row in rows.items() if clients in trivial}
            for path, rows in results["uservalue_service"].items() if path != "by_id_1000"}
        print(json.dumps(results["service_vs_trivial_bentoml"], indent=1))
    (OUT / "serve.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
