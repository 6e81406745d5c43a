"""``Scheduler``: the queue in front of the server's one compute thread.

All torch work of a server runs on one thread (torch work spread over Python threads lost its intra-op
parallelism here). Jobs wait in a priority queue: inference steps before forward/backward passes of training
jobs, first come first served within a priority, so a training run sharing a server does not stall chat.
A job starts as soon as the thread is free: nothing ever waits for company.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch


class Priority(enum.IntEnum):
    INFERENCE = 0  # session steps: someone is waiting for the next token
    TRAINING = 1  # forward / backward passes
    BACKGROUND = 2  # loading blocks, measuring throughput


class Scheduler:
    """Runs jobs on one compute thread, by priority. ``await run(priority, fn, *args)`` returns ``fn(*args)``."""

    def __init__(self, num_threads: Optional[int] = None):
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="corolla-compute",
            initializer=torch.set_num_threads if num_threads else None,
            initargs=(num_threads,) if num_threads else (),
        )
        self._queue: Optional[asyncio.PriorityQueue] = None
        self._worker: Optional[asyncio.Task] = None
        self._order = itertools.count()
        self.jobs_run = 0

    async def run(self, priority: Priority, fn: Callable[..., Any], *args) -> Any:
        if self._worker is None:
            self._queue = asyncio.PriorityQueue()
            self._worker = asyncio.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((int(priority), next(self._order), fn, args, future))
        return await future

    @property
    def waiting(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            _, _, fn, args, future = await self._queue.get()
            if future.cancelled():  # its requester gave up while it waited
                continue
            try:
                result = await loop.run_in_executor(self.executor, fn, *args)
            except asyncio.CancelledError:
                if not future.done():
                    future.cancel()
                raise
            except Exception as exc:  # handed to the requester
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
            self.jobs_run += 1

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self.executor.shutdown(wait=False, cancel_futures=True)
