"""Load benchmark (issue 19): 8 clients for 60 s on a mix of valid and invalid /predict requests, against
the real service and, in the same run, the trivial BentoML service (bench/serving/trivial_service.py, the
same input type: BentoML's own cost). For each: requests, errors (a valid request not answered 200, any
5xx, or no answer), invalid requests accepted (2xx), req/s, p50/p99 of the valid requests, the worker's RSS
at the start and the end of the load (its growth should stay under 10 %), sampled every tenth of it.

The RSS "start" is measured after a warm-up load (`--warmup`, 10 s of the same mix): the growth is that of
a served worker, not its first requests' one-off costs (lazy imports and caches, allocator arenas), which
`ready` (the worker's RSS once it answered its first request) to `start` shows apart; the growth over the
second half of the load tells a leak (still growing) from a level reached. The trivial service is BentoML
as shipped: its TimeoutMiddleware keeps every request's timer, and with it the request's tracing span,
alive for traffic.timeout (60 s) after the answer, so its RSS climbs for the first minute of any load; the
uservalue service cancels that timer (uservalue.serving.traffic), the cause of its own growth (issue 19).

    python bench/load.py [--seconds 60] [--clients 8] [--warmup 10] [--project .]

`--project` serves the Bento that project's package stage built (`uservalue serve`); the valid request
is bench/serve.py's (three purchases in 1997: a user of the CDNOW or synthetic calendar). Printed and
written to bench/out/load.json, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import BIN, OUT, REQUEST, ROOT, _free_port, _start, _stop

WORKER_MODULE = "_bentoml_impl.worker.service"
EVENT = REQUEST["events"][0]
# One of each kind of client mistake the service refuses (issue 19), as raw bodies.
INVALID: dict[str, bytes] = {name: json.dumps(body).encode() for name, body in {
    "as_of out of range": {**REQUEST, "as_of": "9999-12-31T00:00:00Z"},
    "ts before 1970": {"events": [{**EVENT, "ts": "1400-01-01"}], "as_of": "1997-10-01"},
    "absurd amount": {"events": [{**EVENT, "amount": 1.7e308}], "as_of": "1997-10-01"},
    "amount of a view": {"events": [{**EVENT, "behavior": "view", "amount": 999}], "as_of": "1997-10-01"},
    "amount as a string": {"events": [{**EVENT, "amount": "3"}], "as_of": "1997-10-01"},
    "NUL in user_id": {"events": [{**EVENT, "user_id": "a\x00b"}], "as_of": "1997-10-01"},
    "unknown key": {**REQUEST, "debug": True},
    "unknown behaviour": {"events": [{**EVENT, "behavior": "click"}], "as_of": "1997-10-01"},
}.items()} | {"malformed JSON": b'{"events": [1, 2'}
VALID_PER_INVALID = 4  # the mix: four valid requests for each invalid one


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # valid requests answered 200, seconds
    requests: int = 0
    invalid: int = 0
    invalid_accepted: int = 0  # an invalid request answered 2xx (the trivial service checks less)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _load(url: str, clients: int, seconds: float) -> dict[str, object]:
    import aiohttp

    valid = json.dumps(REQUEST).encode()
    invalid = list(INVALID.items())
    tally = Tally()
    stop_at = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession, number: int) -> None:
        sent = number  # clients start at different points of the mix
        while time.perf_counter() < stop_at:
            sent += 1
            name, body = ("valid", valid) if sent % (VALID_PER_INVALID + 1) else invalid[sent % len(invalid)]
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as error:
                tally.requests += 1
                tally.error(f"{name}: {type(error).__name__}")
                continue
            tally.requests += 1
            if name == "valid":
                if status == 200:
                    tally.latencies.append(time.perf_counter() - started)
                else:
                    tally.error(f"valid: {status}")
            else:
                tally.invalid += 1
                if status < 400:
                    tally.invalid_accepted += 1
                elif status >= 500:
                    tally.error(f"{name}: {status}")

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session, i) for i in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.asarray(tally.latencies) * 1e3 if tally.latencies else np.asarray([np.nan])
    return {"requests": tally.requests, "invalid_requests": tally.invalid, "invalid_accepted": tally.invalid_accepted,
            "errors": sum(tally.errors.values()),
            "error_kinds": tally.errors, "rps": tally.requests / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def worker_rss(server_pid: int) -> int:
    """Resident memory of the server's BentoML worker(s), bytes."""
    children = psutil.Process(server_pid).children(recursive=True)
    workers = [c for c in children if WORKER_MODULE in " ".join(c.cmdline())]
    return sum(w.memory_info().rss for w in workers)


def _sample_rss(server_pid: int, every: float, times: int, out: list[float]) -> None:
    for _ in range(times):
        time.sleep(every)
        out.append(worker_rss(server_pid) / 2**20)


def measure(name: str, command: list[str], cwd: Path, env: dict[str, str], clients: int,
            seconds: float, warmup: float = 10.0) -> dict[str, object]:
    port = _free_port()
    process = _start([*command, "--port", str(port)], cwd, port, env)  # answered one request: ready
    url = f"http://127.0.0.1:{port}/predict"
    samples: list[float] = []  # worker RSS (MB) every tenth of the load
    try:
        rss_ready = worker_rss(process.pid)
        if warmup > 0:
            asyncio.run(_load(url, clients, warmup))  # the RSS baseline is a served worker's
        rss_start = worker_rss(process.pid)
        sampler = threading.Thread(target=_sample_rss, args=(process.pid, seconds / 10, 10, samples), daemon=True)
        sampler.start()
        result = asyncio.run(_load(url, clients, seconds))
        sampler.join()
        rss_end = worker_rss(process.pid)
    finally:
        _stop(process)
    half = samples[len(samples) // 2 - 1] if len(samples) >= 2 else float("nan")
    result |= {"warmup_seconds": warmup, "worker_rss_ready_mb": rss_ready / 2**20,
               "worker_rss_start_mb": rss_start / 2**20, "worker_rss_end_mb": rss_end / 2**20,
               "worker_rss_growth": rss_end / rss_start - 1 if rss_start else float("nan"),
               # a leak keeps growing: the second half of the load against its middle
               "worker_rss_growth_second_half": samples[-1] / half - 1 if samples else float("nan"),
               "worker_rss_samples_mb": [round(s, 1) for s in samples]}
    print(f"{name}: {result['requests']} requests ({result['invalid_requests']} invalid, "
          f"{result['invalid_accepted']} of them accepted), "
          f"{result['errors']} errors {result['error_kinds'] or ''}, {result['rps']:.1f} req/s, "
          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms (valid); worker RSS "
          f"{result['worker_rss_start_mb']:.0f} -> {result['worker_rss_end_mb']:.0f} MB "
          f"({result['worker_rss_growth']:+.1%} from a start after {warmup:.0f} s of warm-up load; "
          f"{result['worker_rss_growth_second_half']:+.1%} over the second half; "
          f"{result['worker_rss_ready_mb']:.0f} MB when ready (one request answered); "
          f"every {seconds / 10:.0f} s: {result['worker_rss_samples_mb']})",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of the same load before the RSS start is measured (0: none)")
    parser.add_argument("--project", type=Path, default=ROOT, help="project whose built Bento is served")
    args = parser.parse_args()
    project = args.project.resolve()
    if not (project / "reports" / "package.json").is_file():
        raise SystemExit(f"no built Bento in {project}: run `make run` (or dvc repro) there first")
    results: dict[str, object] = {"when": dt.datetime.now(dt.UTC).isoformat(), "cpus": os.cpu_count(),
                                  "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
                                  "project": str(project),
                                  "mix": {"valid_per_invalid": VALID_PER_INVALID, "invalid_kinds": list(INVALID)}}
    results["trivial_bentoml"] = measure(
        "trivial_bentoml", [str(BIN / "bentoml"), "serve", "trivial_service:Trivial", "--host", "127.0.0.1"],
        ROOT / "bench" / "serving", {"BENTOML_DO_NOT_TRACK": "true"}, args.clients, args.seconds, args.warmup)
    log_dir = OUT / "load" / "prediction_log"
    results["uservalue_service"] = measure(
        "uservalue_service", [str(BIN / "uservalue"), "serve"], project,
        {"USERVALUE_PREDICTION_LOG_DIR": str(log_dir), "USERVALUE_PROJECT_DIR": str(project)},
        args.clients, args.seconds, args.warmup)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
