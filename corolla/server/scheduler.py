"""``Scheduler``: the queue in front of the server's one compute thread.

All torch work of a server runs on one thread (torch work spread over Python threads lost its intra-op
parallelism here). Jobs wait in a priority queue: inference steps before forward/backward passes of training
jobs, first come first served within a priority, so a training run sharing a server does not stall chat.

Batching: jobs submitted with ``run_batched`` under the same key (inference steps of sessions that can share a
forward pass) are taken together: when the thread frees up, the jobs of that key waiting at that moment run in one
call of the batch function. A job alone never waits for company. When the submitter can tell that more jobs of its key
are due within a moment (``company``: sessions whose next step, by their own rhythm, is due), the thread waits for
them, at most four times what the last call of that key took and never more than ``max_gather_s``. (Servers pass a
``company`` only for steps that come from clients: see ``RequestHandlers``.)

How large a batch pays: ``knee`` (the block stack's ``rows_per_pass``) is the number of rows up to which a call costs
about the same as one row (memory-bound matrix products: the CPU kernels serve four rows per read of the weights),
and past which it costs as much per row as separate calls. A batch stops growing once it holds that many rows: it
does not wait for more, and jobs beyond it run in the next call. Splitting costs no compute there, and it keeps a
chain of servers busy at once: the next server starts on the first part while this one runs the rest. Measured with
eight client processes on a 3-server loopback swarm of the embedded model (benchmarks/bench_concurrency.py): one
convoy of eight (each server in turn, the others idle) gave 66.7-71.2 tokens/s; calls of four gave 83.6-87.7.
"""
from __future__ import annotations

import asyncio
import ctypes
import enum
import heapq
import itertools
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import torch


logger = logging.getLogger(__name__)

PR_SET_NAME = 15  # prctl: the calling thread's name
GATHER_CALLS = 4.0  # wait for company at most this many times what the last call of the key took


class Priority(enum.IntEnum):
    INFERENCE = 0  # session steps: someone is waiting for the next token
    TRAINING = 1  # forward / backward passes
    BACKGROUND = 2  # loading blocks, measuring throughput


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    fn: Callable = field(compare=False)  # fn(*args), or for a batched job batch_fn([item, ...]) -> [result, ...]
    args: tuple = field(compare=False)
    future: asyncio.Future = field(compare=False)
    key: Optional[Hashable] = field(compare=False, default=None)  # batched jobs with equal keys run together
    company: Optional[Callable[[list, float], int]] = field(compare=False, default=None)  # (items, window) -> how many
    #                                                        more jobs of this key are due within window seconds
    rows: int = field(compare=False, default=1)  # rows of activations the job adds to a batched call
    knee: Optional[int] = field(compare=False, default=None)  # rows past which a batch stops growing (None: max_batch)


def _start_compute_thread(num_threads: Optional[int]) -> None:
    """Set up the compute thread: its torch threads and its name (``corolla-compute``, as top -H and /proc show it)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"corolla-compute", 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _lower_priority(nice: int, idle: bool = False) -> None:
    """On Linux, lower the calling (compute) thread's priority (threads torch starts from it inherit it). Steps of a
    chain wait on the messages between servers: a lower compute priority lets the server's event loop
    and its libp2p daemon read, check and relay them as soon as they can run, while the compute thread keeps the
    cores whenever nobody else needs them.

    ``idle``: the thread runs under ``SCHED_IDLE``. Any other thread that wakes takes the core at once, and Linux
    places a waking thread on a core that runs only such threads as on an idle one, so a message between servers, or
    a client's next step on the same machine, never queues behind a pass. Measured with eight client processes on a
    3-server loopback swarm sharing two cores, in one swarm with the setting switched between waves
    (benchmarks/bench_compute_policy.py): +3 to +7 tokens/s of ~130 against nice 5 over three runs, which nice 10,
    15 and 19 did not give (README, Performance, Many sessions at once). The cost: on a machine busy with other work
    the thread gets almost no CPU (it is meant to use what would idle), so such a server serves slowly and its
    clients move on.

    Otherwise it runs ``nice`` steps below the process. Elsewhere than on Linux ``setpriority`` would apply to the
    whole process, so neither is done there. (Once lowered, an unprivileged thread cannot raise it again: servers
    lower it after loading their blocks and measuring their speed, which a busy machine would otherwise starve.)"""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        if idle:
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        elif nice:
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + nice)
    except OSError as error:  # a sandbox may forbid it; the thread then runs at the process's priority
        logger.warning(f"compute thread keeps the process's priority: {error}")


class Scheduler:
    """Runs jobs on one compute thread, by priority; batches jobs that share a key."""

    def __init__(self, num_threads: Optional[int] = None, max_batch: int = 64, max_gather_s: float = 0.2,
                 nice: int = 0, idle: bool = False):
        """``max_gather_s``: the longest a batch waits for company (0: never). ``idle``: the compute thread runs
        under ``SCHED_IDLE``; else ``nice``: how much lower its priority is than the rest of the process (see
        ``_lower_priority``), once ``lower_priority()`` has run."""
        if not 0 <= nice <= 19:
            raise ValueError(f"the compute thread's nice must lie in 0..19, not {nice}")
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="corolla-compute",
            initializer=_start_compute_thread,
            initargs=(num_threads,),
        )
        self._policy = (nice, idle)  # applied by lower_priority()
        self.max_batch = max_batch
        self.max_gather_s = max_gather_s
        self._last_call_s: dict[Hashable, float] = {}  # how long the last call of each batch key took
        self._heap: list[_Job] = []
        self._ready: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self._order = itertools.count()
        self.jobs_run = 0
        self.largest_batch = 0  # the most jobs one batched call took
        self.batched_calls = 0
        self.batched_jobs = 0
        self.batched_cpu_s = 0.0  # compute-thread CPU time the batched calls took
        self.batched_wall_s = 0.0  # wall time the batched calls took (the compute thread busy with steps)
        self.gather_s = 0.0  # time batches waited for company before their call (the compute thread idle, on purpose)

    async def run(self, priority: Priority, fn: Callable[..., Any], *args) -> Any:
        """``fn(*args)`` on the compute thread, after every job of a higher priority queued before it runs."""
        return await self._submit(_Job(int(priority), next(self._order), fn, args, self._future()))

    async def run_batched(self, priority: Priority, key: Hashable, item: Any, batch_fn: Callable[[list], list],
                          company: Optional[Callable[[list, float], int]] = None, rows: int = 1,
                          knee: Optional[int] = None) -> Any:
        """``batch_fn([item, ...])[i]`` for this job's ``item``, together with the jobs of the same ``key`` waiting
        when the thread takes it, up to ``knee`` rows (``rows``: this job's; see the module docstring) and
        ``max_batch`` jobs (``company(items, window_s)``: how many more are due within a window, if known). A result
        that is an exception is raised to its own requester only."""
        return await self._submit(_Job(int(priority), next(self._order), batch_fn, (item,), self._future(), key,
                                       company, max(1, rows), knee))

    async def lower_priority(self) -> None:
        """Give the compute thread its lower priority (``nice`` or ``idle``; see ``_lower_priority``), from now on."""
        await self.run(Priority.BACKGROUND, _lower_priority, *self._policy)

    @property
    def waiting(self) -> int:
        return len(self._heap)

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, job: _Job) -> Any:
        if self._worker is None:
            self._ready = asyncio.Event()
            self._worker = asyncio.create_task(self._work())
        heapq.heappush(self._heap, job)
        self._ready.set()
        return await job.future

    def _take(self) -> list[_Job]:
        """The next job, and if it is batched the waiting jobs of its key (in order, while the batch is not full)."""
        first = heapq.heappop(self._heap)
        if first.key is None:
            return [first]
        batch = [first]
        self._take_key(batch)
        return batch

    def _full(self, batch: list[_Job]) -> bool:
        """``max_batch`` jobs, or rows enough to reach the knee (the first job's)."""
        knee = batch[0].knee
        return len(batch) >= self.max_batch or (knee is not None and sum(job.rows for job in batch) >= knee)

    def _take_key(self, batch: list[_Job]) -> None:
        """Add waiting jobs of ``batch``'s key and priority to it, in order, until it is full."""
        key, priority = batch[0].key, batch[0].priority
        if self._full(batch) or not any(job.key == key for job in self._heap):
            return
        rest = []
        for job in sorted(self._heap):
            if job.key == key and job.priority == priority and not self._full(batch):
                batch.append(job)
            else:
                rest.append(job)
        self._heap = rest
        heapq.heapify(self._heap)

    async def _gather(self, batch: list[_Job]) -> list[_Job]:
        """Wait briefly for the company the batch's jobs expect (see the module docstring)."""
        key, company = batch[0].key, batch[0].company
        budget_s = min(self.max_gather_s, GATHER_CALLS * self._last_call_s.get(key, 0.0))
        deadline = asyncio.get_running_loop().time() + budget_s
        while not self._full(batch):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or company([job.args[0] for job in batch], left) == 0:
                break
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except asyncio.TimeoutError:
                pass
            self._take_key(batch)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._heap:
                self._ready.clear()
                await self._ready.wait()
            jobs = self._take()
            if jobs[0].company is not None:
                waited_from = loop.time()
                jobs = await self._gather(jobs)
                self.gather_s += loop.time() - waited_from
            jobs = [job for job in jobs if not job.future.cancelled()]  # requesters that gave up
            if not jobs:
                continue
            try:
                if jobs[0].key is None:
                    results = [await loop.run_in_executor(self.executor, jobs[0].fn, *jobs[0].args)]
                else:
                    started = loop.time()
                    results, cpu_s = await loop.run_in_executor(self.executor, _timed, jobs[0].fn,
                                                                [job.args[0] for job in jobs])
                    self._last_call_s[jobs[0].key] = loop.time() - started
                    self.batched_wall_s += self._last_call_s[jobs[0].key]
                    self.batched_cpu_s += cpu_s
                    self.batched_calls += 1
                    self.batched_jobs += len(jobs)
                    self.largest_batch = max(self.largest_batch, len(jobs))
            except asyncio.CancelledError:
                for job in jobs:
                    job.future.cancel()
                raise
            except Exception as exc:  # handed to every requester of the call
                results = [exc] * len(jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            self.jobs_run += len(jobs)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self.executor.shutdown(wait=False, cancel_futures=True)


def _timed(fn, items):
    """``fn(items)`` and the CPU time this thread spent on it."""
    started = time.thread_time()
    return fn(items), time.thread_time() - started
