"""``dynaflow serve``: the HTTP server around the scheduler (FastAPI; uvicorn runs it).

Every text (or text pair) of a request is one queued item. One scheduler task on the event loop dispatches a
batch whenever the worker is free; the batch runs on a single worker thread so the event loop keeps taking
requests meanwhile. ``POST /predict`` answers with the label, its probability, the sub-network that served it
and the time it spent queued and computing; ``GET /healthz``; ``GET /metrics`` (Prometheus text).

Bad requests get a 4xx whose ``detail`` names the field and what is allowed: 422 for a malformed body, an
empty text, a pair sent to a single-sentence task, a text longer than the model takes; 413 for too many texts
in one request. Overload never crashes the server: a full queue answers 503 with ``Retry-After``, and with
``late: shed`` a request whose deadline passed in the queue answers 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from dynaflow.data.splits import pad
from dynaflow.serving.actuators import Actuator
from dynaflow.serving.metrics import ServerMetrics
from dynaflow.serving.policy import Policy
from dynaflow.serving.profile import ServingProfile
from dynaflow.serving.scheduler import Dispatch, LatePolicy, Queued, Scheduler

log = logging.getLogger(__name__)

MAX_TEXTS = 256  # texts in one request
BATCH = "_batch"  # an answer's (batch id, texts, requests in the batch), for the engine only


@dataclass(frozen=True)
class ServeSettings:
    slo: float  # seconds
    max_batch: int = 32
    late: LatePolicy = "fastest"
    max_queue: int = 1024
    max_length: int = 64  # tokens, [CLS] and [SEP] included
    labels: tuple[str, ...] = ()  # class names; () for regression
    pair_task: bool = False  # whether the task takes sentence pairs


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | list[str]
    text_pair: str | list[str] | None = None


class BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Unavailable(Exception):
    """503: the queue is full, or the request's deadline passed while it waited (``late: shed``)."""


class InferenceFailed(Exception):
    """500: running the batch failed; the message names the sub-network and the error."""


@dataclass
class Item:
    input_ids: list[int]
    token_type_ids: list[int]
    future: asyncio.Future[dict[str, Any]]
    request: int  # which HTTP request it came from (a request may send several texts)


class Engine:
    """The queue, its scheduler task and the worker thread: everything but HTTP."""

    def __init__(
        self,
        actuator: Actuator,
        tokenizer: Any,
        profile: ServingProfile,
        policy: Policy,
        settings: ServeSettings,
    ) -> None:
        self.actuator, self.tokenizer, self.profile, self.policy = actuator, tokenizer, profile, policy
        self.settings = settings
        self.scheduler: Scheduler[Item] = Scheduler(
            policy, profile, settings.slo, settings.late, settings.max_queue
        )
        self.metrics = ServerMetrics()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynaflow-infer")
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
        self.requests = 0  # HTTP requests taken so far: the id of the next one
        self.max_chars = max(10_000, 100 * settings.max_length)  # no text this long fits max_length tokens
        self.batches = 0  # dispatched so far: the id of the next batch
        # batch id -> [requests in it, requests answered, slowest answer's delay after the batch ended]
        self.answered: dict[int, list[float]] = {}

    # -- requests -------------------------------------------------------------------------------------------
    def encode(self, body: PredictRequest) -> list[tuple[list[int], list[int]]]:
        texts = [body.text] if isinstance(body.text, str) else body.text
        pairs = body.text_pair
        if pairs is not None and not self.settings.pair_task:
            raise BadRequest(
                422, "field 'text_pair': this model's task takes single sentences; send 'text' only"
            )
        if pairs is None and self.settings.pair_task:
            raise BadRequest(422, "field 'text_pair' is required: this model's task takes sentence pairs")
        pair_list = [pairs] if isinstance(pairs, str) else pairs
        if pair_list is not None and (
            isinstance(body.text, str) != isinstance(pairs, str) or len(pair_list) != len(texts)
        ):
            raise BadRequest(
                422, "fields 'text' and 'text_pair' must both be strings or lists of the same length"
            )
        if not texts:
            raise BadRequest(422, "field 'text': the list is empty; send at least one text")
        if len(texts) > MAX_TEXTS:
            raise BadRequest(413, f"field 'text': {len(texts)} texts in one request; at most {MAX_TEXTS}")
        encoded = []
        for n, text in enumerate(texts):
            where = "text" if isinstance(body.text, str) else f"text[{n}]"
            pair = pair_list[n] if pair_list is not None else None
            if not text.strip():
                raise BadRequest(422, f"field '{where}': empty text; send some words")
            if pair is not None and not pair.strip():
                raise BadRequest(
                    422, f"field '{where.replace('text', 'text_pair')}': empty text; send some words"
                )
            chars = len(text) + len(pair or "")
            if chars > self.max_chars:  # refused before tokenising: a huge text would stall the event loop
                limits = f"at most {self.max_chars} (and {self.settings.max_length} tokens)"
                raise BadRequest(413, f"field '{where}': {chars} characters; {limits}")
            enc = self.tokenizer(text, pair)
            length = len(enc["input_ids"])
            if length > self.settings.max_length:
                raise BadRequest(
                    422,
                    f"field '{where}': {length} tokens; this model takes at most {self.settings.max_length} "
                    "([CLS] and [SEP] included)",
                )  # fmt: skip
            types = enc.get("token_type_ids") or [0] * length
            encoded.append((list(enc["input_ids"]), list(types)))
        return encoded

    async def predict(self, body: PredictRequest, arrival: float | None = None) -> list[dict[str, Any]]:
        """Queue every text of ``body``; ``arrival``: when the request reached the server (its deadline runs
        from there, so parsing and tokenising count against it)."""
        encoded = self.encode(body)
        loop = asyncio.get_running_loop()
        now = arrival if arrival is not None else time.monotonic()
        self.requests += 1
        items = [Item(ids, types, loop.create_future(), self.requests) for ids, types in encoded]
        if len(self.scheduler) + len(items) > self.settings.max_queue:  # all of the request, or none of it
            self.metrics.requests.labels("rejected").inc(len(items))
            self.metrics.slo_misses.inc(len(items))
            raise Unavailable(f"the queue is full ({self.settings.max_queue} texts waiting); retry shortly")
        for item in items:
            self.scheduler.admit(Queued(now, len(item.input_ids), item))
        self.metrics.queue.set(len(self.scheduler))
        self.wakeup.set()
        return list(await asyncio.gather(*(i.future for i in items)))

    def observe_answer(self, batch: tuple[int, int, int], seconds: float) -> None:
        """A request in ``batch`` (id, texts, requests) got its last byte sent ``seconds`` after the batch
        ended; once every request in the batch has answered, the slowest one tells the policy what answering
        a batch of that many texts costs."""
        batch_id, size, requests = batch
        entry = self.answered.setdefault(batch_id, [requests, 0, 0.0])
        entry[1] += 1
        entry[2] = max(entry[2], seconds)
        if entry[1] >= entry[0]:
            self.policy.observe_answers(size, self.answered.pop(batch_id)[2])
        for stale in [k for k in self.answered if k < batch_id - 100]:  # requests that never answered
            del self.answered[stale]

    # -- the scheduler task ---------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while len(self.scheduler):
                await self._dispatch_next(loop)
                self.metrics.queue.set(len(self.scheduler))

    async def _dispatch_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """One dispatch. Whatever goes wrong fails that batch's requests (500), never the scheduler task:
        a dead task would leave every later request waiting forever."""
        dispatch = None
        try:
            dispatch = self.scheduler.next(time.monotonic())
            if dispatch is None:
                return
            self.metrics.dispatch_overhead.observe(dispatch.decide_seconds)
            for q in dispatch.shed:
                self._fail(
                    q.payload, Unavailable("deadline passed while queued; shed (serve.late: shed)"), "shed"
                )
            batch = [q for q in dispatch.batch if not q.payload.future.done()]
            if batch:
                await self._serve(loop, dispatch, batch)
        except Exception as exc:
            log.exception("dispatch failed")
            # The batch that failed, or (when choosing it failed) the oldest request: the next try differs.
            lost = dispatch.batch if dispatch is not None else [self.scheduler.queue.popleft()]
            subnet = dispatch.subnet if dispatch is not None else None
            for q in lost:
                self._fail(q.payload, InferenceFailed(f"sub-network {subnet}: {exc}"), "error")

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, dispatch: Dispatch[Item], batch: list[Queued[Item]]
    ) -> None:
        assert dispatch.subnet is not None
        items = [q.payload for q in batch]
        inputs = pad([i.input_ids for i in items], [i.token_type_ids for i in items], self.pad_id)
        start = time.monotonic()
        logits = await loop.run_in_executor(self.worker, self.actuator, dispatch.subnet, inputs)
        if len(logits) != len(batch):
            raise RuntimeError(f"the model answered {len(logits)} rows for a batch of {len(batch)}")
        done = time.monotonic()
        self.scheduler.done(dispatch, done - start)
        self.batches += 1
        batch_key = (self.batches, len(batch), len({q.payload.request for q in batch}))
        self.metrics.batch_size.observe(len(batch))
        for q, row in zip(batch, logits, strict=True):
            total = done - q.arrival
            self.metrics.latency.observe(total)
            self.metrics.requests.labels("ok").inc()
            self.metrics.subnet.labels(dispatch.subnet).inc()
            if total > self.settings.slo:
                self.metrics.slo_misses.inc()
            if not q.payload.future.done():
                q.payload.future.set_result(
                    {
                        **self.answer(row),
                        "subnet": dispatch.subnet,
                        "batch_size": len(batch),
                        "queue_ms": (start - q.arrival) * 1000,
                        "compute_ms": (done - start) * 1000,
                        BATCH: batch_key,  # taken out before the answer is sent
                    }  # fmt: skip
                )

    def _fail(self, item: Item, exc: Exception, status: str) -> None:
        if item.future.done():  # already answered, or its request was refused or went away
            return
        self.metrics.requests.labels(status).inc()
        self.metrics.slo_misses.inc()
        item.future.set_exception(exc)

    def answer(self, logits: np.ndarray) -> dict[str, Any]:
        if not self.settings.labels:  # regression: the score is the prediction
            return {"label": None, "label_id": None, "score": float(logits[0])}
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        k = int(probs.argmax())
        return {"label": self.settings.labels[k], "label_id": k, "score": float(probs[k])}


FIELD_TYPES = {"text": "a string or a list of strings", "text_pair": "a string, a list of strings or null"}


def _field_path(loc: Sequence[Any]) -> str:
    """``("body", "text", "list[str]", 1)`` -> ``text[1]``: pydantic's union-member tags left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and "[" not in str(part) and str(part) not in ("str", "none"):
            path += f".{part}" if path else str(part)
    return path or "body"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where, kind = _field_path(err.get("loc", ())), err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"field '{where}' is not allowed (fields: text, text_pair)")
        elif kind == "missing":
            parts.append(f"field '{where}' is required")
        elif kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('msg', '')})")
        elif where in FIELD_TYPES:
            parts.append(f"field '{where}' must be {FIELD_TYPES[where]}")
        else:
            parts.append(f"field '{where}': {err.get('msg', 'invalid')}")
    return (
        "; ".join(dict.fromkeys(parts)) + ' (expected {"text": "...", "text_pair": "..."} or lists of texts)'
    )


ARRIVAL = "dynaflow.arrival"


SERVED = "dynaflow.served"  # (seconds from arrival to the end of the request's batch, its batch), by /predict


class ArrivalTime:
    """ASGI middleware: stamps each request with the time it reached the server, before body parsing, and
    tells the engine how long the answer took from the end of its batch to its last byte sent."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrival = scope[ARRIVAL] = time.monotonic()

        async def timed_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and SERVED in scope:
                served, batch = scope[SERVED]
                self.engine.observe_answer(batch, time.monotonic() - arrival - served)

        await self.app(scope, receive, timed_send)


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.task = asyncio.create_task(engine.run())
        try:
            yield
        finally:
            engine.task.cancel()
            engine.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dynaflow elastic BERT", lifespan=lifespan)
    app.add_middleware(ArrivalTime, engine=engine)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        engine.metrics.requests.labels("invalid").inc()
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest) -> JSONResponse:
        engine.metrics.requests.labels("invalid").inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(InferenceFailed)
    async def failed(request: Request, exc: InferenceFailed) -> JSONResponse:
        return JSONResponse({"detail": f"inference failed: {exc}"}, status_code=500)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.post("/predict")
    async def predict(body: PredictRequest, request: Request) -> Any:
        answers = await engine.predict(body, request.scope.get(ARRIVAL))
        batches = [a.pop(BATCH) for a in answers]
        last = max(range(len(answers)), key=lambda k: answers[k]["queue_ms"] + answers[k]["compute_ms"])
        request.scope[SERVED] = (
            (answers[last]["queue_ms"] + answers[last]["compute_ms"]) / 1000,
            batches[last],
        )
        return answers[0] if isinstance(body.text, str) else {"predictions": answers}

    @app.get("/healthz")
    async def healthz() -> Any:
        if engine.task is None or engine.task.done():
            return JSONResponse({"status": "down", "detail": "the scheduler is not running"}, status_code=503)
        return {
            "status": "ok", "replica": os.getpid(), "policy": engine.policy.name,
            "slo_ms": engine.settings.slo * 1000, "queue": len(engine.scheduler),
            "runtime": engine.actuator.runtime,
            "front": [s.name for s in engine.profile.front()],
            # requests/s the full model sustains one at a time at the longest length (``Nc`` trace rates)
            "capacity_rps": 1 / engine.profile.full.predict(1, engine.settings.max_length),
        }  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
