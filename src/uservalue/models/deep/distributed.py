"""A deep model's training on several processes (`train.<model>.distributed.nproc_per_node` > 1).

The train stage prepares everything in its own process (tensors, statistics, the initial network)
and `train_distributed` hands it to `nproc_per_node` workers started by torchrun
(`python -m torch.distributed.run`, a subprocess, rendezvous on a free port of 127.0.0.1). Each worker
runs this module's `main`: it joins the process group (NCCL on CUDA, one GPU per process; gloo on
the CPU), wraps the network in DistributedDataParallel and runs the one training loop
(loop.fit_loop) on its shard of the user-level training rows. Rank 0 alone writes the checkpoints
(resumable as in one process, each rank's RNG state included) and the result, and sends each epoch's
metrics to the stage, which logs them to MLflow and answers before rank 0 goes on: the stage's
logging sees every epoch once, in order, and stopping the stage stops training after that epoch.
The stage then loads rank 0's best weights. A failing worker fails the stage with its error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uservalue.errors import ConfigError, TransientError, UservalueError
from uservalue.io import atomic_path
from uservalue.models.base import FitContext, log_metrics_nowhere
from uservalue.models.deep.checkpoints import CHECKPOINT_FILE
from uservalue.models.deep.data import FeatureTensors
from uservalue.models.deep.runtime import rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from uservalue.models.deep.model import TorchParams

log = logging.getLogger(__name__)

PAYLOAD_FILE = "payload.pt"
RESULT_FILE = "result.pt"
LOG_FILE = "torchrun.log"
ERROR_PREFIX = "error-rank"
WORKER_MODULE = "uservalue.models.deep.distributed"
# How long a collective (and the rendezvous) may wait for a peer before failing the run.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
LAUNCH_ATTEMPTS = 3  # the rendezvous port is free when probed, not reserved: retry if it was taken


class DistributedTrainingError(RuntimeError):
    """A training worker failed with an unexpected error (a bug): names its rank and its error.
    Its configuration, input and transient (OSError) errors come back as ConfigError,
    UservalueError and TransientError, so the stage exits as it would in one process."""


# -- the stage's side ---------------------------------------------------------------------------
def train_distributed(
    net: nn.Module,
    data: FeatureTensors,
    valid: np.ndarray,
    *,
    params: TorchParams,
    ctx: FitContext,
    horizon_days: float,
    device: torch.device,
    run_fingerprint: str,
    nproc_per_node: int,
) -> dict[str, Any]:
    """loop.train_network on `nproc_per_node` processes: `net` ends with rank 0's best weights;
    returns rank 0's fit summary."""
    if device.type == "cuda" and torch.cuda.device_count() < nproc_per_node:
        raise ConfigError(f"distributed.nproc_per_node is {nproc_per_node} but {torch.cuda.device_count()} "
                          "CUDA device(s) are visible (one process per GPU; or set train.device: cpu)")
    with tempfile.TemporaryDirectory(prefix="uservalue-ddp-") as tmp:
        workdir = Path(tmp)
        torch.save({
            "net": net.cpu(), "data": data, "valid": valid, "params": params, "horizon_days": horizon_days,
            "run_fingerprint": run_fingerprint, "seed": ctx.seed, "valid_fraction": ctx.valid_fraction,
            "checkpoint_dir": None if ctx.checkpoint_dir is None else str(ctx.checkpoint_dir),
            "device": device.type, "rng": rng_state(),
        }, workdir / PAYLOAD_FILE)

        def on_epoch(metrics: dict[str, float], epoch: int) -> None:
            log.info("epoch %d (%d processes): train %.5f valid %.5f (%.1f s, %.0f rows/s)", epoch, nproc_per_node,
                     metrics["train_loss"], metrics["valid_loss"], metrics["epoch_seconds"],
                     metrics["samples_per_second"])
            ctx.log_metrics(metrics, epoch)

        log.info("training on %d processes (torchrun, %s)", nproc_per_node,
                 "NCCL" if device.type == "cuda" else "gloo")
        run_workers(workdir, nproc_per_node, on_epoch)
        result = torch.load(workdir / RESULT_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(result["state"])
    net.to(device).eval()
    if ctx.checkpoint_dir is not None:  # rank 0 keeps it until the result is read back here
        (Path(ctx.checkpoint_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    return dict(result["summary"])


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun_command(workdir: Path, nproc_per_node: int, port: int, control_port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(port),
        "--max-restarts", "0",
        "-m", WORKER_MODULE, str(workdir), "--control-port", str(control_port),
    ]


def worker_environment(nproc_per_node: int) -> dict[str, str]:
    env = dict(os.environ)
    # the cores shared out among the processes (torchrun's own default is 1 thread each)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_workers(workdir: Path, nproc_per_node: int,
                on_epoch: Callable[[dict[str, float], int], None] = log_metrics_nowhere) -> None:
    """torchrun with `nproc_per_node` workers over `workdir` (which holds PAYLOAD_FILE); each epoch's
    metrics from rank 0 go to on_epoch(metrics, epoch). When the run fails, raises the first failing
    worker's error as _failure maps it (TransientError when none reported one); an exception from
    on_epoch stops the workers and propagates."""
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        with socket.create_server(("127.0.0.1", 0)) as control:
            command = torchrun_command(workdir, nproc_per_node, free_port(), int(control.getsockname()[1]))
            log_path = workdir / LOG_FILE
            with open(log_path, "wb") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=worker_environment(nproc_per_node), start_new_session=True)
                try:
                    _serve(control, process, on_epoch)
                finally:
                    _stop(process)
        if process.returncode == 0:
            return
        tail = log_path.read_text(errors="replace")[-4000:]
        errors = _worker_errors(workdir)
        if not errors and "address already in use" in tail.lower() and attempt < LAUNCH_ATTEMPTS:
            log.warning("rendezvous port was taken; starting the workers again")
            continue
        raise _failure(errors, tail, nproc_per_node, process.returncode)


def _serve(control: socket.socket, process: subprocess.Popen, on_epoch: Callable[[dict[str, float], int], None]) -> None:
    """Until the workers exit: rank 0's epoch messages, one JSON line each, to on_epoch, each answered.
    (Should this process die without stopping them, rank 0 finds the line closed at its next epoch
    and fails, which stops the others.)"""
    control.settimeout(0.2)
    connection: socket.socket | None = None
    buffer = b""
    try:
        while True:
            exited = process.poll() is not None
            if connection is None:
                if exited:
                    return
                try:
                    connection, _ = control.accept()
                    connection.settimeout(0.2)
                except TimeoutError:
                    pass
                continue
            try:
                chunk = connection.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:  # rank 0 is done (or gone): wait for the exit
                connection.close()
                connection = None
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                message = json.loads(line)
                on_epoch(message["metrics"], int(message["epoch"]))
                connection.sendall(b"ok\n")
    finally:
        if connection is not None:
            connection.close()


def _stop(process: subprocess.Popen) -> None:
    """The whole torchrun process group, if still running: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _worker_errors(workdir: Path) -> list[dict[str, Any]]:
    """The errors workers reported, the first one first (a worker that fails takes its peers' collectives down)."""
    errors = []
    for path in workdir.glob(f"{ERROR_PREFIX}*.json"):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(errors, key=lambda e: e.get("time", 0.0))


def _failure(errors: list[dict[str, Any]], tail: str, nproc_per_node: int, returncode: int | None) -> Exception:
    if not errors:
        log.error("torchrun output:\n%s", tail)
        # no worker said why: killed from outside (out of memory, a signal), or torchrun itself failed
        return TransientError(
            f"distributed training ({nproc_per_node} processes) failed with exit code {returncode} and no "
            f"worker error; torchrun said: {tail.strip().splitlines()[-1] if tail.strip() else '(nothing)'}")
    first = errors[0]
    log.error("training worker rank %s failed:\n%s", first.get("rank"), first.get("traceback", ""))
    message = (f"distributed training failed on rank {first.get('rank')} of {nproc_per_node}: "
               f"{first.get('type')}: {first.get('message')}")
    # the exit code the error would have had in one process (cli.common.reports_errors)
    kind = {"config": ConfigError, "input": UservalueError, "transient": TransientError}
    return kind.get(first.get("kind", ""), DistributedTrainingError)(message)


def error_kind(error: BaseException) -> str:
    """How the stage reports a worker's error: as the same error would be reported in one process."""
    if isinstance(error, TransientError | OSError):
        return "transient"
    if isinstance(error, ConfigError):
        return "config"
    return "input" if isinstance(error, UservalueError) else "bug"


# -- the worker's side --------------------------------------------------------------------------
class EpochRelay:
    """Rank 0's line to the stage: each epoch's metrics, waiting for the stage's answer."""

    def __init__(self, port: int) -> None:
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.connection.settimeout(None)

    def __call__(self, metrics: dict[str, float], epoch: int) -> None:
        self.connection.sendall(json.dumps({"epoch": epoch, "metrics": metrics}).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = self.connection.recv(16)
            if not chunk:
                raise ConnectionError("the train stage stopped listening to the training workers")
            answer += chunk

    def close(self) -> None:
        self.connection.close()


def train_worker(workdir: Path, rank: int, world: int, local_rank: int, control_port: int | None) -> None:
    """One process's part of the run described by workdir/PAYLOAD_FILE; rank 0 writes RESULT_FILE."""
    from uservalue.models.deep.loop import fit_loop  # loop imports this module for the stage's side

    payload = torch.load(workdir / PAYLOAD_FILE, map_location="cpu", weights_only=False, mmap=True)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cuda = payload["device"] == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                         timeout=COLLECTIVE_TIMEOUT)
    relay = EpochRelay(control_port) if rank == 0 and control_port is not None else None
    try:
        # rank 0 draws as the one process would have; the others their own dropout masks
        set_rng_state(payload["rng"])
        if rank:
            seed_everything(int(payload["seed"]) * 7_919 + rank)
        ctx = FitContext(seed=payload["seed"], device=payload["device"], valid_fraction=payload["valid_fraction"],
                         checkpoint_dir=None if payload["checkpoint_dir"] is None else Path(payload["checkpoint_dir"]),
                         log_metrics=relay if relay is not None else log_metrics_nowhere)
        net = payload["net"]
        summary = fit_loop(net, payload["data"], payload["valid"], params=payload["params"], ctx=ctx,
                           horizon_days=payload["horizon_days"], device=device,
                           run_fingerprint=payload["run_fingerprint"], rank=rank, world=world,
                           remove_checkpoint=False)
        if rank == 0:
            with atomic_path(workdir / RESULT_FILE) as tmp:
                torch.save({"state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                            "summary": summary}, tmp)
    finally:
        if relay is not None:
            relay.close()
        torch.distributed.destroy_process_group()


def report_error(workdir: Path, rank: int, error: BaseException) -> None:
    """workdir/error-rank<r>.json: what failed here, for the stage to show."""
    record = {"rank": rank, "type": type(error).__name__, "kind": error_kind(error), "message": str(error),
              "time": time.time(),
              "traceback": "".join(traceback.format_exception(error))}
    with atomic_path(workdir / f"{ERROR_PREFIX}{rank}.json") as tmp:
        tmp.write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    """The entry torchrun starts in each process (`-m uservalue.models.deep.distributed WORKDIR`)."""
    parser = argparse.ArgumentParser(prog=WORKER_MODULE, description=main.__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--control-port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank " + os.environ.get("RANK", "0")
                        + " %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    try:
        train_worker(args.workdir, rank, int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")), args.control_port)
    except BaseException as error:
        report_error(args.workdir, rank, error)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
