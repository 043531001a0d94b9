"""Faults of the serving processes: `kill -9` of the worker under load (the arbiter restarts it; every
later request is answered and the prediction log reads back whole), then `kill -9` of the whole server
group, as when `make serve`'s terminal dies (the worker must not outlive it holding the port)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

import httpx
import pytest

from tests.support.serving import (
    EVAL_CUTOFF,
    Server,
    alive,
    eval_users,
    events_of,
    port_is_free,
    wait_until,
)
from uservalue.serving.prediction_log import read_prediction_log

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


class Load:
    """Clients sending valid /predict requests until stopped; outcomes counted by phase."""

    def __init__(self, server: Server, body: dict, clients: int = 4) -> None:
        self.server, self.body = server, body
        self.phase = "before"
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    status = str(client.post(f"{self.server.url}/predict", json=self.body).status_code)
                except httpx.HTTPError as error:  # refused or reset while no worker listens
                    status = type(error).__name__
                    time.sleep(0.05)
                self.outcomes[(phase, status)] += 1

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


def test_worker_killed_under_load_then_every_request_is_answered(served_project: Path, tmp_path: Path) -> None:
    server = Server(served_project, tmp_path / "prediction_log", USERVALUE_LOG_FLUSH_SECONDS="0.5")
    user = eval_users(served_project, 1, offset=4)[0]
    body = {"events": events_of(served_project, [user]), "as_of": EVAL_CUTOFF}
    expected = server.post("/predict", body).json()["predictions"]
    workers: list[int] = []
    try:
        [worker] = server.worker_pids()
        with Load(server, body) as load:
            assert wait_until(lambda: load.outcomes[("before", "200")] >= 20, 60), load.outcomes
            load.phase = "crash"
            os.kill(worker, signal.SIGKILL)
            started = time.monotonic()
            # The arbiter starts a new worker; until it is ready clients get errors (README: the gap).
            assert wait_until(lambda: server.worker_pids() not in ([], [worker]), 60), server.worker_pids()
            server.wait_ready()
            assert wait_until(lambda: server.post("/predict", body).status_code == 200, 60)
            print(f"no answers for {time.monotonic() - started:.1f} s after the worker was killed")
            load.phase = "after"
            assert wait_until(lambda: sum(n for (p, _), n in load.outcomes.items() if p == "after") >= 40, 120)
        after = {status: n for (phase, status), n in load.outcomes.items() if phase == "after"}
        assert set(after) == {"200"}, load.outcomes  # every later request answered
        assert server.post("/predict", body).json()["predictions"] == expected
        # Files are written whole (temporary name, then rename): what was flushed reads back.
        assert wait_until(lambda: len(read_prediction_log(server.log_dir)) >= after["200"], 30)
        logged = read_prediction_log(server.log_dir)
        assert set(logged["user_id"]) == {user} and logged["p_buy"].notna().all()
        # kill -9 of the whole server group (make serve's terminal killed): no worker outlives it.
        workers = server.worker_pids()
        assert workers
        server.kill_group()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 30), \
            f"worker(s) {[p for p in workers if alive(p)]} survived their server"
        assert wait_until(lambda: port_is_free(server.port), 30)
    finally:
        if server.process.poll() is None:
            server.stop()
        for pid in [*server.worker_pids(), *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
