"""The real service for tests: a small synthetic project through the whole DVC pipeline, then `uservalue
serve` (what `make serve` runs: `bentoml serve` of the built Bento) on a free 127.0.0.1 port, called over
HTTP and stopped by its process group. Shared by tests/e2e/test_service.py and tests/reliability/."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd
import psutil

from tests.e2e.conftest import free_port, new_project, run_in, tool_env, use_synthetic_data

EVAL_CUTOFF = "1998-01-01T00:00:00+00:00"  # use_synthetic_data's split.eval_cutoff
WORKER_MODULE = "_bentoml_impl.worker.service"  # the command line of BentoML's worker process


def build_served_project(root: Path, models: tuple[str, ...] = ("linear",)) -> Path:
    """A copy of the project in a fresh git + DVC repository under `root`, on the small synthetic world,
    after `dvc repro` (..., register, package: a champion and a built Bento)."""
    new_project(root)
    use_synthetic_data(root, list(models))
    run_in(root, "dvc", "repro", timeout=1200)
    return root


class Server:
    """`uservalue serve` of a project on a free port, started in its own session (process group)."""

    def __init__(self, project: Path, log_dir: Path, max_users: int = 60, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        environment = tool_env(USERVALUE_PREDICTION_LOG_DIR=str(log_dir), USERVALUE_MAX_USERS=str(max_users), **env)
        if "USERVALUE_API_KEY" not in env:
            environment.pop("USERVALUE_API_KEY", None)  # a key in the developer's shell must not leak in
        self.output_path = log_dir.parent / f"serve-{self.port}.log"
        self.output = open(self.output_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(["uservalue", "serve", "--port", str(self.port)], cwd=project,
                                        env=environment, stdout=self.output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_ready()

    def wait_ready(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output_path.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"service not ready:\n{self.output_path.read_text()}")

    def post(self, path: str, body: object, **headers: str) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60)

    def worker_pids(self) -> list[int]:
        """BentoML's worker processes of this server (children of its arbiter, in process groups of their own)."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if _is_worker(c))

    def stop(self) -> int:
        # SIGTERM, as a process manager stops it: the service must flush its prediction log.
        os.killpg(self.process.pid, signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.output.close()
        return code

    def kill_group(self) -> None:
        """kill -9 of the server's process group, as when `make serve`'s terminal is killed."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.output.close()


def _is_worker(process: psutil.Process) -> bool:
    try:
        return WORKER_MODULE in process.cmdline()
    except psutil.Error:
        return False


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_is_free(port: int) -> bool:
    """A server can listen on the port again (with SO_REUSEADDR, as uvicorn binds: the load's closed
    connections may linger in TIME_WAIT)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(condition: Callable[[], object], seconds: float, step: float = 0.2) -> bool:
    """Poll `condition` until true or `seconds` pass; its last value (no timed assertion: a deadline)."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def events_of(project: Path, users: list[str]) -> list[dict]:
    """The users' validated events, as a client sends them."""
    events = pd.read_parquet(project / "data/validated.parquet")
    rows = events[events["user_id"].isin(users)].copy()
    rows["ts"] = rows["ts"].map(lambda t: t.isoformat())
    return [{k: v for k, v in row.items() if v is not None and not pd.isna(v)} for row in rows.to_dict("records")]


def eval_users(project: Path, n: int, offset: int = 0) -> list[str]:
    features = pd.read_parquet(project / "data/features/eval.parquet", columns=["user_id"])
    return features["user_id"].iloc[offset::7].head(n).tolist()
