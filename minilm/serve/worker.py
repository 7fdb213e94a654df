"""The decoding worker behind `minilm serve`: a bounded queue of jobs and one thread that runs them.

    worker = Worker(model, tokenizer, max_queue=16)
    job = worker.submit(prompt_ids, Sampling(max_tokens=64, temperature=0.7), emit)  # Busy when full
    # emit("text", piece) for each piece of the reply, then emit("done", "stop" | "length")
    # or emit("error", message); job.completion_tokens counts the tokens sampled
    worker.close()

The HTTP handlers run on the server's event loop, and decoding is a long CPU (or GPU) loop that
must not block it. So each request becomes a `Job` on a `queue.Queue(maxsize=max_queue)`, and one
thread takes the jobs one at a time and samples each with `minilm.generate.stream` (the KV cache).
When the queue is full, `submit` raises `Busy` at once and the server answers HTTP 429: a client
learns immediately that it should retry later, and memory cannot grow with the number of clients.
A job whose client went away is cancelled: skipped if still waiting, stopped at its next token if
running.

Deviations from a production server: one worker, no batching of concurrent requests (replies come
out one after another; a tiny model decodes a token in milliseconds, so the queue drains quickly),
and no top_k (the OpenAI API has none).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minilm.chat_cli import decode_stream
from minilm.generate import stream


class Busy(Exception):
    """The queue is full: the request was not accepted (HTTP 429)."""


@dataclass
class Sampling:
    max_tokens: int                  # tokens sampled at most, the stop token included
    temperature: float = 1.0         # 0: greedy
    top_p: float = 1.0               # nucleus sampling; 1: the whole distribution
    stop: tuple[str, ...] = ()       # the reply is cut before the first of these strings
    seed: int | None = None          # None: a fresh random seed per request


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[str, object], None]   # called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0


class StopText:
    """Streamed text cut before the first stop string.

    A piece may end with the start of a stop string ("Us" of "User:"); that tail is held back until
    the next piece shows whether the stop string follows. Invariant: no stop string starts inside
    the text already sent, so a stop string found later can always be cut out in full.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.text, self.sent = "", 0   # everything so far; how much of it went out

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string was reached)."""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.sent = self.text[self.sent:end], end
            return out, True
        end = max(len(self.text) - self._held(), self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        """The held-back tail, once the reply has ended without reaching a stop string."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(len(self.text), longest - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0


class Worker:
    """One thread that decodes the queued jobs in order, each with the KV cache."""

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.stops = set(tokenizer.special_tokens.values())  # a reply ends at any special token
        self.device = next(model.parameters()).device
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="minilm-decoder", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], sampling: Sampling, emit) -> Job:
        job = Job(prompt, sampling, emit)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy: {self.jobs.maxsize} requests are already waiting "
                       f"(minilm serve --max-queue); retry in a moment") from None
        return job

    def close(self) -> None:
        """Stop after the jobs already queued (the sentinel None waits its turn)."""
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                job.emit("done", self.run(job))
            except Exception as e:  # noqa: BLE001 (a failed job must not end the worker)
                with contextlib.suppress(Exception):
                    job.emit("error", f"decoding failed: {type(e).__name__}: {e}")

    def run(self, job: Job) -> str:
        """Sample the job's reply, emitting its text piece by piece; returns the finish reason."""
        s = job.sampling
        seed = s.seed if s.seed is not None else random.getrandbits(63)
        generator = torch.Generator(self.device).manual_seed(seed)
        finish = "length"   # unless a special token or a stop string ends the reply first

        def tokens():  # the reply's ids up to (without) the special token that ends it
            nonlocal finish
            for t in stream(self.model, job.prompt, s.max_tokens, s.temperature, None, s.top_p,
                            self.stops, generator):
                job.completion_tokens += 1
                if t in self.stops:
                    finish = "stop"
                    return
                if job.cancelled.is_set():
                    return
                yield t

        cut = StopText(s.stop)
        for piece in decode_stream(self.tokenizer, tokens()):
            text, reached = cut.feed(piece)
            if text:
                job.emit("text", text)
            if reached:
                return "stop"
        if tail := cut.flush():
            job.emit("text", tail)
        return finish
