"""The scheduler in front of the compute thread: one job at a time, inference before training, FIFO within."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

from corolla.server.scheduler import Priority, Scheduler


def test_inference_jobs_jump_ahead_of_queued_training_jobs():
    async def scenario():
        scheduler = Scheduler()
        order, gate = [], threading.Event()
        busy = asyncio.create_task(scheduler.run(Priority.TRAINING, gate.wait, 10))  # occupies the thread
        await asyncio.sleep(0.05)
        jobs = [asyncio.create_task(scheduler.run(priority, order.append, name))
                for priority, name in [(Priority.TRAINING, "train-1"), (Priority.INFERENCE, "step-1"),
                                       (Priority.TRAINING, "train-2"), (Priority.INFERENCE, "step-2")]]
        await asyncio.sleep(0.05)
        assert scheduler.waiting == 4 and order == []
        gate.set()
        await asyncio.gather(busy, *jobs)
        await scheduler.close()
        return order

    assert asyncio.run(scenario()) == ["step-1", "step-2", "train-1", "train-2"]


def test_jobs_run_one_at_a_time_on_one_thread_and_errors_reach_their_caller():
    async def scenario():
        scheduler = Scheduler()
        threads, running, overlap = set(), [0], [False]

        def job():
            running[0] += 1
            overlap[0] |= running[0] > 1
            threads.add(threading.get_ident())
            time.sleep(0.01)
            running[0] -= 1

        await asyncio.gather(*(scheduler.run(Priority.INFERENCE, job) for _ in range(5)))

        def broken():
            raise ValueError("bad job")

        try:
            await scheduler.run(Priority.TRAINING, broken)
        except ValueError as exc:
            error = str(exc)
        assert await scheduler.run(Priority.INFERENCE, lambda: 42) == 42  # the thread survives a failed job
        await scheduler.close()
        return threads, overlap[0], error

    threads, overlapped, error = asyncio.run(scenario())
    assert len(threads) == 1 and threading.get_ident() not in threads and not overlapped and error == "bad job"


def test_batches_take_every_queued_step_and_wait_only_for_company_that_is_due():
    async def scenario():
        scheduler = Scheduler(max_gather_s=0.5)
        calls = []

        def batch(items):
            calls.append(list(items))
            time.sleep(0.02)
            return [item * 10 for item in items]

        alone = lambda items, window: 0  # noqa: E731 - nobody else is due
        started = time.monotonic()
        assert await scheduler.run_batched(Priority.INFERENCE, "k", 1, batch, alone) == 10
        assert time.monotonic() - started < 0.1  # a lone step never waits
        assert scheduler.gather_s < 0.005 and scheduler.batched_wall_s >= 0.02 > scheduler.batched_cpu_s  # it slept
        # while the thread is busy, three steps queue: they run as one call
        gate = threading.Event()
        busy = asyncio.create_task(scheduler.run(Priority.TRAINING, gate.wait, 5))
        await asyncio.sleep(0.02)
        queued = [asyncio.create_task(scheduler.run_batched(Priority.INFERENCE, "k", i, batch, alone)) for i in (2, 3, 4)]
        await asyncio.sleep(0.02)
        gate.set()
        assert await asyncio.gather(*queued) == [20, 30, 40] and calls[-1] == [2, 3, 4]
        await busy
        # a step whose company is due waits for it (bounded by 4x the last call and max_gather_s)
        due = {"count": 1}
        expecting = lambda items, window: due["count"] if len(items) < 2 else 0  # noqa: E731
        first = asyncio.create_task(scheduler.run_batched(Priority.INFERENCE, "k", 5, batch, expecting))
        await asyncio.sleep(0.03)
        second = asyncio.create_task(scheduler.run_batched(Priority.INFERENCE, "k", 6, batch, expecting))
        assert await asyncio.gather(first, second) == [50, 60] and calls[-1] == [5, 6]
        assert 0.02 <= scheduler.gather_s < 0.08  # the ~0.03 s the first step waited for the second is counted
        assert scheduler.batched_wall_s >= 0.02 * scheduler.batched_calls  # each call slept 0.02 s
        # company that never comes costs at most the bound: 4 x the last call (~0.02 s), well under max_gather_s
        started = time.monotonic()
        assert await scheduler.run_batched(Priority.INFERENCE, "k", 7, batch, lambda items, window: 1) == 70
        assert time.monotonic() - started < 0.3
        await scheduler.close()

    asyncio.run(scenario())


def test_batches_stop_growing_at_the_knee():
    """Past ``knee`` rows a batch neither takes more waiting steps (they run in the next call, in order) nor waits
    for company that is due; a step of many rows runs even though it alone passes the knee."""
    async def scenario():
        scheduler = Scheduler(max_gather_s=0.5)
        calls = []

        def batch(items):
            calls.append([item for item, _ in items])
            time.sleep(0.02)
            return [item * 10 for item, _ in items]

        def submit(item, rows=1, company=lambda items, window: 0):
            return asyncio.create_task(scheduler.run_batched(Priority.INFERENCE, "k", (item, rows), batch, company,
                                                             rows=rows, knee=4))

        gate = threading.Event()
        busy = asyncio.create_task(scheduler.run(Priority.TRAINING, gate.wait, 5))
        await asyncio.sleep(0.02)
        queued = [submit(i) for i in range(1, 10)]  # nine steps of one row each wait for the thread
        await asyncio.sleep(0.02)
        gate.set()
        assert await asyncio.gather(*queued) == [10 * i for i in range(1, 10)]
        assert calls == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
        await busy
        # rows, not steps, fill a batch: a two-row step and two one-row steps reach four
        calls.clear()
        busy = asyncio.create_task(scheduler.run(Priority.TRAINING, gate.wait, 5))
        gate.clear()
        await asyncio.sleep(0.02)
        queued = [submit(1, rows=2), submit(2), submit(3), submit(4), submit(5, rows=9)]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(*queued, busy)
        assert calls == [[1, 2, 3], [4, 5]]
        # a full batch does not wait for company that is due: it never even asks who is due
        calls.clear()
        asked = []

        def due(items, window):
            asked.append(len(items))
            return 3

        busy = asyncio.create_task(scheduler.run(Priority.TRAINING, gate.wait, 5))
        gate.clear()
        await asyncio.sleep(0.02)
        queued = [submit(i, company=due) for i in range(1, 5)]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(*queued, busy)
        assert calls == [[1, 2, 3, 4]] and asked == []
        # below the knee it does wait for them
        waiting = submit(5, company=due)
        await asyncio.sleep(0.01)
        joined = submit(6, company=due)
        assert await asyncio.gather(waiting, joined) == [50, 60] and calls[-1] == [5, 6] and asked
        await scheduler.close()

    asyncio.run(scenario())


def _thread_nice(scheduler: Scheduler) -> tuple[int, int]:
    """(the compute thread's nice, this thread's nice)."""
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario():
        await scheduler.lower_priority()
        compute = await scheduler.run(Priority.INFERENCE, nice)
        await scheduler.close()
        return compute

    return asyncio.run(scenario()), nice()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_compute_thread_runs_its_nice_steps_below_the_rest_of_the_process():
    compute, own = _thread_nice(Scheduler(nice=5))
    assert compute == min(own + 5, 19)
    compute, own = _thread_nice(Scheduler(nice=0))
    assert compute == own
    with pytest.raises(ValueError, match="nice must lie in 0..19, not 20"):
        Scheduler(nice=20)
    with pytest.raises(ValueError, match="nice must lie in 0..19, not -1"):
        Scheduler(nice=-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling policies are Linux's")
def test_an_idle_compute_thread_runs_under_sched_idle_and_the_rest_of_the_process_does_not():
    def policy() -> int:
        return os.sched_getscheduler(threading.get_native_id())

    async def scenario(scheduler):
        before = await scheduler.run(Priority.INFERENCE, policy)  # loading and measuring run at the usual policy
        await scheduler.lower_priority()
        compute = await scheduler.run(Priority.INFERENCE, policy)
        await scheduler.close()
        assert before == os.SCHED_OTHER
        return compute

    assert asyncio.run(scenario(Scheduler(idle=True, nice=5))) == os.SCHED_IDLE
    assert policy() == os.SCHED_OTHER  # only the compute thread
    assert asyncio.run(scenario(Scheduler(nice=5))) == os.SCHED_OTHER


def test_cpu_servers_compute_under_sched_idle_unless_told_otherwise():
    from corolla.cli.main import build_parser, serve_config

    assert serve_config(build_parser().parse_args(["serve", "smollm2"])).compute_idle
    assert not serve_config(build_parser().parse_args(["serve", "smollm2", "--no-compute-idle"])).compute_idle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")
def test_the_compute_thread_is_named_for_top_and_proc():
    def name() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
            return comm.read().strip()

    async def scenario():
        scheduler = Scheduler()
        named = await scheduler.run(Priority.INFERENCE, name)
        await scheduler.close()
        return named

    assert asyncio.run(scenario()) == "corolla-compute"
