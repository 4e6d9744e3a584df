"""Continuous batching: one decoding loop in a thread serves every request, across adapters.

Each loop turn (1) admits waiting jobs while slots are free and the turn's prompt-token budget lasts
(so a crowd of newcomers is prefilled in chunks, with decoding steps for the running sequences in
between): their prompts are prefilled in one forward (left-padded, each row with its job's adapter;
one forward per input-method family, as a mixed batch holds one: prompt tuning and prefix tuning
newcomers are prefilled apart, and what such an adapter puts in front of the prompt enters the row's
cache there), each job's ``n`` choices pick their first tokens and join the batch with copies of the
prompt's cache row; (2) runs ONE forward for all running sequences, each row with its own adapter,
its own cache row and position (:mod:`.batch_cache`, :mod:`.mixed_forward`); (3) lets sequences that
finished (end-of-sequence token, a stop string, ``max_tokens``) or whose client went away leave at
once, freeing their slots for the next turn.

Faults stay with their request: a prefill or a decoding step that raises is retried job by job (row
by row), so only the rows that raise alone fail (their jobs get an error event) and
every other sequence goes on. The HTTP layer sees a job only through the events it ``emit``s.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .batch_cache import BatchCache
from .errors import ApiError
from .mixed_forward import prefill_groups, prefill_rows, step_rows
from .sampling import SamplingParams, make_generator, pick_token
from .text import TextTracker

log = logging.getLogger("deltatune.serve")


@dataclass
class Event:
    """What a job reports: new ``text`` of a choice, its ``finish`` (reason, tokens), or an ``error``."""

    kind: str  # "text" | "finish" | "error"
    choice: int = 0
    text: str = ""
    reason: str | None = None
    tokens: int = 0


@dataclass(eq=False)
class Job:
    """One prompt to continue ``n`` times with adapter ``adapter``; ``emit`` is called from the engine thread."""

    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    open_choices: int = 0


@dataclass(eq=False)
class _Sequence:
    job: Job
    choice: int
    generator: torch.Generator | None
    tracker: TextTracker
    last_token: int = -1
    generated: int = 0


class Engine:
    """The decoding loop; ``submit`` and ``cancel`` are safe to call from any thread."""

    def __init__(self, registry: Any, tokenizer: Any, eos_ids: set[int], max_batch: int = 32,
                 max_queue: int = 256, max_prefill_tokens: int = 512) -> None:
        self.registry = registry  # an AdapterRegistry: .lock (held around every forward), .model, .draining
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled per turn (at least one job)
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: set[Job] = set()  # waiting or running
        self.cond = threading.Condition()
        self.batch = BatchCache()
        self.seqs: list[_Sequence] = []  # one per batch row, in row order
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)

    # -- called from the HTTP side ------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ApiError(503, "The server is shutting down; no new requests are taken.")
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"The queue is full ({self.max_queue} requests waiting); retry shortly.")
            self.registry.check_served(job.adapter)  # 404 once its unload has begun
            job.open_choices = job.n
            self.waiting.append(job)
            self.jobs.add(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: the job's sequences leave before the next step."""
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
            self.jobs.discard(job)
            self.cond.notify()

    def jobs_using(self, adapter: str) -> int:
        with self.cond:
            return sum(job.adapter == adapter for job in self.jobs)

    def unload(self, adapter: str) -> int:
        """Unload ``adapter`` now when no request uses it (returns 0), else drain it: new requests for it
        get a 404 from now on, and the loop unloads it once its requests in flight (the count returned) are done."""
        with self.cond:
            self.registry.start_unload(adapter)  # 404 for an unknown adapter
            busy = sum(job.adapter == adapter for job in self.jobs)
            self.cond.notify()
        if not busy:
            self.registry.finish_unload(adapter)
        return busy

    def _drained(self) -> list[str]:
        """Draining adapters no request uses any more (call with ``cond`` held)."""
        used = {job.adapter for job in self.jobs} | {seq.job.adapter for seq in self.seqs}
        return [name for name in self.registry.draining if name not in used]

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {"running_sequences": len(self.seqs), "waiting_requests": len(self.waiting),
                    "slots": self.max_batch, "draining_adapters": list(self.registry.draining)}

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left and end the loop (the HTTP server has already drained its requests)."""
        with self.cond:
            self.stopping = True
            for job in list(self.jobs):
                job.cancelled.set()
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.seqs and not self._drained():
                    self.cond.wait()
                if self.stopping:
                    return
                drained = self._drained()
                admitted: list[Job] = []
                free, budget = self.max_batch - len(self.seqs), self.max_prefill_tokens
                while self.waiting and self.waiting[0].n <= free and (
                        not admitted or len(self.waiting[0].prompt_ids) <= budget):
                    job = self.waiting.popleft()
                    free, budget = free - job.n, budget - len(job.prompt_ids)
                    admitted.append(job)
            for name in drained:  # between two steps: no forward is running
                self.registry.finish_unload(name)
            self._prefill(admitted)
            self._drop_cancelled()
            if self.seqs:
                self._decode_step()

    def _prefill(self, jobs: list[Job]) -> None:
        """First forwards of the newcomers' prompts (each with its adapter; one per group of rows that
        may share one, see :func:`.mixed_forward.prefill_groups`); their choices join the batch."""
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        try:
            with self.registry.lock:
                groups = prefill_groups(self.registry.model, [job.adapter for job in jobs])
        except Exception:  # noqa: BLE001 (an adapter that cannot be grouped fails alone, below)
            groups = [[i] for i in range(len(jobs))]
        for group in groups:
            self._prefill_group([jobs[i] for i in group])

    def _prefill_group(self, jobs: list[Job]) -> None:
        inputs = BatchCache.prefill_inputs([job.prompt_ids for job in jobs])
        try:
            with self.registry.lock:
                logits, tensors, mask = prefill_rows(self.registry.model, [job.adapter for job in jobs], inputs)
        except Exception as exc:  # noqa: BLE001 (find the jobs that fail alone; the others go on)
            if len(jobs) == 1:
                self._fail(jobs[0], exc)
            else:
                for job in jobs:
                    self._prefill_group([job])
            return
        rows: list[int] = []
        for row, job in enumerate(jobs):
            for choice in range(job.n):
                seq = _Sequence(job, choice, make_generator(job.params, choice),
                                TextTracker(self.tokenizer, job.params.stop))
                if self._take_token(seq, logits[row]):
                    rows.append(row)
                    self.seqs.append(seq)
        if rows:
            index = torch.tensor(rows)  # a job's prompt row once per running choice
            self.batch.join([(k.index_select(0, index), v.index_select(0, index)) for k, v in tensors],
                            mask.index_select(0, index))

    def _decode_step(self) -> None:
        names = [s.job.adapter for s in self.seqs]
        inputs = self.batch.step_inputs([s.last_token for s in self.seqs])
        try:
            with self.registry.lock:
                logits, tensors = step_rows(self.registry.model, names, inputs, self.batch.tensors)
            self.batch.advance(tensors)
        except Exception:  # noqa: BLE001 (find the rows that fail alone; the others go on)
            logits = self._retry_rows_alone(names, inputs)
        keep = [row for row, seq in enumerate(self.seqs) if self._take_token(seq, logits[row])]
        self._keep(keep)

    def _retry_rows_alone(self, names: list[str], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ok: list[int] = []
        rows_logits: list[torch.Tensor] = []
        rows_tensors: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for row, seq in enumerate(self.seqs):
            one = torch.tensor([row])
            try:
                with self.registry.lock:
                    row_logits, row_tensors = step_rows(
                        self.registry.model, [names[row]], {k: v.index_select(0, one) for k, v in inputs.items()},
                        [(k.index_select(0, one), v.index_select(0, one)) for k, v in self.batch.tensors])
            except Exception as exc:  # noqa: BLE001
                self._fail(seq.job, exc)
                continue
            ok.append(row)
            rows_logits.append(row_logits)
            rows_tensors.append(row_tensors)
        self.seqs = [self.seqs[row] for row in ok]
        if not ok:
            self.batch = BatchCache()
            return torch.zeros(0, 0)
        layers = [(torch.cat([t[i][0] for t in rows_tensors]), torch.cat([t[i][1] for t in rows_tensors]))
                  for i in range(len(rows_tensors[0]))]
        self.batch.replace_rows(ok, layers)
        return torch.cat(rows_logits)

    def _take_token(self, seq: _Sequence, logits: torch.Tensor) -> bool:
        """Pick, record and report one token of ``seq``; False when the sequence is over."""
        job = seq.job
        if job.cancelled.is_set():
            return False
        try:
            token = pick_token(logits, job.params, seq.generator)
            seq.generated += 1
            seq.last_token = token
            reason = "stop" if token in self.eos_ids else None
            piece = "" if reason else seq.tracker.push(token)
            if seq.tracker.stopped:
                reason = "stop"
            elif reason is None and seq.generated >= job.params.max_tokens:
                reason = "length"
            if reason:
                piece += seq.tracker.finish()
            if piece:
                job.emit(Event("text", seq.choice, text=piece))
        except Exception as exc:  # noqa: BLE001
            self._fail(job, exc)
            return False
        if reason:
            job.emit(Event("finish", seq.choice, reason=reason, tokens=seq.generated))
            self._choice_done(job)
            return False
        return True

    def _choice_done(self, job: Job) -> None:
        job.open_choices -= 1
        if job.open_choices <= 0:
            with self.cond:
                self.jobs.discard(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        log.exception("generation failed (adapter %s): %s", job.adapter, exc, exc_info=exc)
        if not job.cancelled.is_set():
            job.emit(Event("error", text=f"{type(exc).__name__}: {exc}"))
        self.cancel(job)

    def _drop_cancelled(self) -> None:
        self._keep([row for row, seq in enumerate(self.seqs) if not seq.job.cancelled.is_set()])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) != len(self.seqs):
            self.batch.keep(rows)
            self.seqs = [self.seqs[row] for row in rows]
