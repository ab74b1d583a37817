"""``dynaflow loadtest``: an open-loop load generator for ``dynaflow serve``.

Requests go out at seeded Poisson times (:mod:`.traces`) whether or not earlier ones were answered
(open loop: a slow server cannot slow the generator down and hide its queue), carrying labelled dev sentences,
so accuracy is measured on what was served. Latency runs from each request's scheduled send time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from dynaflow.serving.outcomes import Outcome


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int | None  # class id; None for regression or unlabelled


def health_url(predict_url: str) -> str:
    """``http://host:port/predict`` -> ``http://host:port/healthz``."""
    return predict_url.rsplit("/", 1)[0] + "/healthz"


def dev_examples(task: str, glue_dir: str | None) -> list[Example]:
    """The task's dev sentences with their labels (GLUE folder, else the hub)."""
    from dynaflow.data.glue import get_task, load_split

    spec = get_task(task)
    split = load_split(spec, spec.main_dev_split, glue_dir)
    pairs = split.text_b or [None] * len(split)
    labels = [None if spec.is_regression else int(y) for y in split.labels]
    return [Example(a, b, y) for a, b, y in zip(split.text_a, pairs, labels, strict=True)]


async def _send(session: Any, url: str, example: Example, scheduled: float, start: float) -> Outcome:
    await asyncio.sleep(max(0.0, start + scheduled - time.perf_counter()))
    body = {"text": example.text} | ({"text_pair": example.text_pair} if example.text_pair else {})
    try:
        async with session.post(url, json=body) as response:
            status, answer = response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return Outcome(scheduled, "error")
    latency = time.perf_counter() - (start + scheduled)
    if status == 503:
        return Outcome(scheduled, "shed" if "deadline" in answer.get("detail", "") else "rejected")
    if status != 200:
        return Outcome(scheduled, "error")
    correct = None if example.label is None else answer.get("label_id") == example.label
    server = (answer.get("queue_ms", 0.0) + answer.get("compute_ms", 0.0)) / 1000
    return Outcome(scheduled, "ok", latency, answer.get("subnet"), correct, server)


async def _run(
    url: str, times: Sequence[float], examples: Sequence[Example], timeout: float
) -> list[Outcome]:
    # aiohttp: about 1 ms less client time per request than httpx's AsyncClient here (BENCHMARKS.md, "Elastic
    # serving"), which matters when the SLO is 17.5 ms and the generator has one core.
    connector = aiohttp.TCPConnector(limit=0)  # no cap: an open-loop generator never waits for a connection
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        async with session.get(health_url(url)) as response:  # connect before the clock starts
            await response.read()
        start = time.perf_counter() + 0.2
        tasks = [
            asyncio.create_task(_send(session, url, examples[i % len(examples)], float(t), start))
            for i, t in enumerate(times)
        ]
        return list(await asyncio.gather(*tasks))


def run_load(
    url: str, times: Sequence[float], examples: Sequence[Example], timeout: float = 30.0
) -> list[Outcome]:
    """Send ``examples`` (cycled) to ``url`` at the scheduled ``times``; one outcome per request."""
    if not examples:
        raise ValueError("no examples to send")
    return asyncio.run(_run(url, times, examples, timeout))
