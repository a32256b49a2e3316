"""The one thread that owns `simone serve`'s model and runs its requests, one at a time.

Jobs wait in a FIFO queue; a job is one request (all of its prompts and choices), with its own
KV cache and its own `torch.Generator`, so outputs never mix and the global RNG is never
touched. A job whose client went away stops at its next token (or leaves the queue unrun).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from simone.inference.decoding import Step, StopText, sample_tokens
from simone.inference.load import LoadedModel

MAX_WAITING = 16  # jobs waiting behind the running one, unless told otherwise


class QueueFull(Exception):
    """A job refused by `ModelWorker.submit`: `max_waiting` jobs already wait."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: list[str]
    n_top_logprobs: int | None  # None: no logprobs
    strip: bool = False  # chat: reply without surrounding whitespace
    end_ids: list[int] = field(default_factory=list)  # tokens that end a choice as end-of-document does


@dataclass
class Piece:
    """New text of choice `index`, and the tokens whose text begins in it."""

    index: int
    text: str
    steps: list[Step]


@dataclass
class Finished:
    index: int
    reason: str  # "stop" (end of document, an end token or a stop string) | "length" (max_tokens)
    completion_tokens: int


@dataclass
class Job:
    """One request: every prompt (token ids) times n choices, drawn from one generator."""

    prompts: list[list[int]]
    n: int
    sampling: Sampling
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    deliver: Any = None  # set by ModelWorker.submit: hands an event to the request's loop


def run_job(loaded: LoadedModel, job: Job) -> Iterator[Piece | Finished]:
    """Generate every choice of a job in order, yielding its text as it is released."""
    generator = torch.Generator(device=loaded.device).manual_seed(job.seed)
    for p, ids in enumerate(job.prompts):
        for j in range(job.n):
            if job.cancelled.is_set():
                return
            yield from generate_choice(loaded, p * job.n + j, ids, job.sampling, generator, job.cancelled)


def generate_choice(
    loaded: LoadedModel, index: int, ids: list[int], s: Sampling, generator: torch.Generator, cancelled: threading.Event
) -> Iterator[Piece | Finished]:
    """One choice: its text as it is released (with the tokens behind it), then how it ended.
    Stops early, without a Finished event, once `cancelled` is set."""
    tok = loaded.tokenizer
    text = StopText(tok, s.stop, s.strip)
    pending: list[Step] = []  # steps whose text has not been released yet
    reason, n_tokens = "length", 0
    for step in sample_tokens(
        loaded.model, ids, s.max_tokens, s.temperature, s.top_k, s.top_p, generator, n_top=s.n_top_logprobs
    ):
        if cancelled.is_set():
            return
        n_tokens += 1
        if step.token == tok.eod_id or step.token in s.end_ids:
            reason = "stop"
            break
        step.offset, delta = text.add(step.token)
        pending.append(step)
        if delta:  # with a stop string found, the text before it (in this token too)
            ready = [st for st in pending if st.offset < text.released]
            pending = pending[len(ready) :]
            yield Piece(index, delta, ready)
        if text.stop_at is not None:
            reason = "stop"
            break
    delta = text.finish()
    end = len(text.text) if text.stop_at is None else text.stop_at
    ready = [st for st in pending if st.offset < end]  # a stop string's own tokens are left out
    if delta or ready:
        yield Piece(index, delta, ready)
    yield Finished(index, reason, n_tokens)


_DONE = object()


class ModelWorker:
    """The model's thread and its queue: at most `max_waiting` jobs wait (not counting those whose clients left)."""

    def __init__(self, loaded: LoadedModel, max_waiting: int = MAX_WAITING):
        self.loaded, self.max_waiting = loaded, max_waiting
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="simone-serve-model")
        self.thread.start()

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue a job (or raise QueueFull); its events (then _DONE, or the exception that
        ended it) arrive on the returned asyncio queue of the calling event loop, read by
        `job_events`. Called only from that loop, so the count and the put are one step."""
        if self.waiting() >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} jobs are already waiting")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                job.cancelled.set()

        job.deliver = deliver
        self.jobs.put(job)
        return events

    def waiting(self) -> int:
        """Jobs in the queue whose clients are still there."""
        with self.jobs.mutex:  # the queue's own lock: the model thread takes jobs meanwhile
            return sum(1 for job in self.jobs.queue if job is not None and not job.cancelled.is_set())

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # the client left while it waited
                continue
            try:
                for event in run_job(self.loaded, job):
                    if job.cancelled.is_set():
                        break
                    job.deliver(event)
                job.deliver(_DONE)
            except Exception as e:
                job.deliver(e)


async def job_events(events: asyncio.Queue, job: Job) -> AsyncIterator[Piece | Finished]:
    """A submitted job's events, as they come; leaving early cancels the job."""
    try:
        while (item := await events.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        job.cancelled.set()  # a client that went away stops the job at its next token
