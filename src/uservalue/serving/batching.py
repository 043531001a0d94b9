"""The service's request path: concurrent requests scored together (one feature query, one forward pass),
and the Prometheus histograms of those batches."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from uservalue.serving.prediction_log import PredictionLog, finite_rows
from uservalue.serving.requests import Event, RequestError, as_of_time
from uservalue.serving.scorer import ScoredBatch, Scorer, ScoreRequest

logger = logging.getLogger(__name__)

# The prediction log's rows are built for many batches at once (one DataFrame and one finiteness check
# per LOG_ROWS rows or LOG_SECONDS, whichever comes first): built per batch they cost about 1 ms of the
# scoring thread per request, on the GIL beside the event loop's HTTP work (issue 15's profile).
LOG_ROWS = 256
LOG_SECONDS = 0.25
# A lone small request (nothing else queued) is scored on the event loop itself: handed to the scoring
# thread it pays two thread switches and the GIL's wake-up for nothing to overlap with (issue 15: at one
# client that hand-off was most of the run-to-run jitter of the by-id p50). Batches and requests with many
# users or events still go to the thread, so the loop keeps accepting requests while they are scored.
INLINE_MAX_USERS = 4
INLINE_MAX_EVENTS = 512


class BatchingPredictor:
    """The service's request path: requests that arrive while a batch is being scored wait, and
    are scored together next, with one feature query and one forward pass.

    This amortises the fixed cost of a query (about 15 ms in DuckDB's planner, whatever the number
    of users) over every request that queued meanwhile. A lone request is scored at once. Under
    load, a batch waits up to `max_wait_ms` for as many requests as the previous batch held: the
    clients just answered need a moment to send their next request, and without the wait a steady
    load of N clients splits into a batch of 1 and a batch of N-1, paying the fixed cost twice.
    A batch holds at most `max_users` users and `max_events` events (the per-request limits);
    batches are scored on one thread beside the event loop, which keeps accepting requests (a lone small
    request on the loop itself: INLINE_MAX_USERS).
    """

    def __init__(self, scorer: Scorer, log: PredictionLog, max_wait_ms: float = 5.0,
                 observe: Callable[[int, float], None] | None = None) -> None:
        self.scorer = scorer
        self.log = log
        self.max_wait = max_wait_ms / 1000
        self._observe = observe  # (requests in the batch, seconds to score it), e.g. Prometheus
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uservalue-scorer")
        self._queue: deque[tuple[ScoreRequest, asyncio.Future[Any]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._expected = 1  # requests the next batch waits for: the previous batch's size
        self.batches = 0
        self.largest_batch = 0
        # Answered batches whose log rows are still to be built (touched on the event loop's thread only).
        self._unlogged: list[tuple[ScoredBatch, Sequence[Any]]] = []
        self._unlogged_rows = 0
        self._log_timer: asyncio.TimerHandle | None = None
        self._log_timer_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def predict(self, events: Sequence[Event], as_of: dt.datetime | None,
                      user_ids: Sequence[str] = (), explain: str | None = None) -> dict[str, Any]:
        """The response body for one /predict call; raises RequestError for a client mistake."""
        try:
            as_of = as_of_time(as_of)  # the HTTP model checks it too; a library caller may not have
        except ValueError as error:
            raise RequestError(["as_of"], str(error)) from None
        request = self.scorer.prepare(events, as_of, user_ids, explain=explain)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queue.append((request, answer))
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await answer

    async def _gather(self) -> None:
        """Wait (at most max_wait) until as many requests queue as the previous batch held."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(self._queue) < self._expected:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _next_batch(self) -> list[tuple[ScoreRequest, asyncio.Future[Any]]]:
        batch = [self._queue.popleft()]
        users, events = len(batch[0][0].users), len(batch[0][0].events)
        while self._queue:
            request = self._queue[0][0]
            users += len(request.users)
            events += len(request.events)
            if users > self.scorer.max_users or events > self.scorer.max_events:
                break
            batch.append(self._queue.popleft())
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait > 0 and len(self._queue) < self._expected:
                await self._gather()
            batch = self._next_batch()
            self._expected = len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            started = time.perf_counter()
            requests = [r for r, _ in batch]
            try:
                if len(requests) == 1 and not self._queue and _small(requests[0]):
                    answers, scored = self._score(requests)
                else:
                    answers, scored = await loop.run_in_executor(self._executor, self._score, requests)
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch (their 500)
                answers, scored = [error] * len(batch), None
            if self._observe is not None:
                self._observe(len(batch), time.perf_counter() - started)
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
            if scored is not None:
                # After the answers are out, and for many batches at once (LOG_ROWS, LOG_SECONDS): the
                # log's rows are built on the scoring thread, off the requests' latency.
                self._defer_log(loop, scored, answers)

    def _defer_log(self, loop: asyncio.AbstractEventLoop, scored: ScoredBatch, answers: Sequence[Any]) -> None:
        self._unlogged.append((scored, answers))
        self._unlogged_rows += len(scored)
        if self._unlogged_rows >= min(LOG_ROWS, self.log.flush_records):
            self._submit_log()
        elif self._log_timer is None or self._log_timer_loop is not loop:
            # (A timer of an event loop since closed never fires: a library caller running asyncio.run
            # per call; close() logs what is left.)
            self._log_timer, self._log_timer_loop = loop.call_later(LOG_SECONDS, self._submit_log), loop

    def _submit_log(self) -> None:
        """The pending batches' log rows to the scoring thread, built after the batch it is on."""
        if self._log_timer is not None:
            self._log_timer.cancel()
            self._log_timer = None
        pending, self._unlogged, self._unlogged_rows = self._unlogged, [], 0
        if pending and not self._closed:
            self._executor.submit(self._log_many, pending)
        elif pending:
            self._log_many(pending)

    def _score(self, requests: list[ScoreRequest]) -> tuple[list[Any], ScoredBatch | None]:
        """Each request's answer (a body or a RequestError), and the batch whose rows are still to be
        logged (None when the requests were scored and logged one by one). Everything a request's input
        can make fail, scoring and building the answers, is inside the fallback that scores each
        request alone; the prediction log comes after, and a failure there loses log rows, never answers."""
        try:
            batch = self.scorer.score_batch(requests)
            answers = [_finite_or_error(answer) for answer in self.scorer.answers(batch)]
        except Exception:
            if len(requests) == 1:
                raise
            # Something failed that validation did not catch: score each request alone, so one
            # request's problem fails that request only.
            return [self._answer_one(r) for r in requests], None
        return answers, batch

    def _log(self, batch: ScoredBatch, answers: Sequence[Any]) -> None:
        """The answered predictions into the prediction log (not those of a request that failed)."""
        self._log_many([(batch, answers)])

    def _log_many(self, pending: Sequence[tuple[ScoredBatch, Sequence[Any]]]) -> None:
        """The answered predictions of several batches into the prediction log, as one frame (not those
        of a request that failed)."""
        pending = [(batch, answers) for batch, answers in pending if len(batch)]
        if not pending:
            return
        try:
            frame = self.scorer.log_frame(*(batch for batch, _ in pending), skip=[
                [i for i, answer in enumerate(answers) if isinstance(answer, RequestError)] for _, answers in pending])
            frame = finite_rows(frame)
            if len(frame):
                self.log.append(frame)
        except Exception:  # the answers stand; the log loses these batches' rows, said loudly
            logger.exception("prediction log: %d rows of %d batches (%d requests) not logged",
                             sum(len(b) for b, _ in pending), len(pending), sum(len(b.requests) for b, _ in pending))

    def _answer_one(self, request: ScoreRequest) -> Any:
        try:
            answers, scored = self._score([request])
        except Exception as error:  # noqa: BLE001 - handed to this request's caller (its 500)
            return error
        if scored is not None:
            self._log(scored, answers)
        return answers[0]

    def close(self) -> None:
        """Finish the batch in flight and the log rows still to build, then flush the prediction log."""
        self._closed = True
        self._executor.shutdown(wait=True)
        self._submit_log()  # what was still waiting to be built, on this thread
        self.log.close()


def _small(request: ScoreRequest) -> bool:
    return len(request.users) <= INLINE_MAX_USERS and len(request.events) <= INLINE_MAX_EVENTS


def _finite_or_error(answer: Any) -> Any:
    """A body whose predictions are all finite, else a 422 naming the first user whose is not (an input
    inside the limits can still take a model outside its range; JSON has no infinity)."""
    if isinstance(answer, RequestError):
        return answer
    for index, row in enumerate(answer["predictions"]):
        values = [row["p_buy"], row["expected_value"], *row["influence"].values()]
        if not all(math.isfinite(v) for v in values):
            return RequestError(["predictions", index], f"the model's prediction for user {row['user_id']!r} is not "
                                                        "finite; expected inputs within the model's range", status=422)
    return answer


@functools.cache
def batch_metrics() -> Callable[[int, float], None]:
    """Prometheus histograms of the batches (on BentoML's /metrics): how many requests each
    batch held and how long it took to score, the two figures for tuning serve.batch_wait_ms.
    Created once per process (Prometheus refuses a second registration)."""
    from prometheus_client import Histogram

    requests = Histogram("uservalue_batch_requests", "Requests scored together in one batch",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    seconds = Histogram("uservalue_batch_seconds", "Time to score one batch: features, model, log",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

    def observe(size: int, elapsed: float) -> None:
        requests.observe(size)
        seconds.observe(elapsed)

    return observe
