"""The hand-off of a save's bytes from the archive thread to the event loop (``_concurrency.Handoff``).

What it promises: every item arrives once and in order; the thread never has more than ``depth``
items waiting; once the receiving task stops, a thread waiting to send (or sending later) raises
``Aborted`` instead of waiting for ever; and it works whether or not the loop is asyncio's.
"""

from __future__ import annotations

import asyncio
import threading

import anyio
import anyio.to_thread
import pytest

from checkpointio._concurrency import Aborted, Handoff


async def _send_then_end(handoff: Handoff[int], items: range) -> None:
    """The producer's side: ``items`` sent from a worker thread, then the end, on the loop."""

    def send_all() -> None:
        for item in items:
            handoff.send(item)

    await anyio.to_thread.run_sync(send_all)
    handoff.end()


def test_items_arrive_once_and_in_order_and_the_iteration_ends_after_the_last() -> None:
    async def main() -> list[int]:
        handoff = Handoff[int](2)
        received: list[int] = []

        async def receive() -> None:
            try:
                async for item in handoff:
                    received.append(item)
                    if item % 100 == 0:
                        await anyio.sleep(0.001)  # let the thread get ahead and wait for room
            finally:
                handoff.stop()

        async with anyio.create_task_group() as group:
            group.start_soon(receive)
            group.start_soon(_send_then_end, handoff, range(1000))
        return received

    assert asyncio.run(main()) == list(range(1000))


def test_the_thread_waits_while_depth_items_are_waiting() -> None:
    async def main() -> tuple[list[int], list[int]]:
        handoff = Handoff[int](3)
        sent: list[int] = []
        waiting_when_taken: list[int] = []

        def send_all() -> None:
            for item in range(10):
                handoff.send(item)
                sent.append(item)

        async def produce() -> None:
            await anyio.to_thread.run_sync(send_all)
            handoff.end()

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            with anyio.fail_after(30):
                while len(sent) < 3:  # the thread fills the hand-off ...
                    await anyio.sleep(0.01)
            await anyio.sleep(0.1)  # ... and waits for room
            stuck = list(sent)
            async for item in handoff:
                waiting_when_taken.append(len(sent) - item)
                await anyio.sleep(0.01)
        return stuck, waiting_when_taken

    stuck, waiting = asyncio.run(main())
    assert stuck == [0, 1, 2]
    assert max(waiting) <= 3


@pytest.mark.parametrize("sending", ["waiting for room", "after the stop"])
def test_a_stopped_receiver_makes_the_thread_raise_aborted_not_wait(sending: str) -> None:
    async def main() -> BaseException | None:
        handoff = Handoff[bytes](1)
        outcome: list[BaseException | None] = []
        stopped = threading.Event()

        def send_all() -> None:
            try:
                if sending == "after the stop":
                    stopped.wait()
                for _ in range(5):  # one fits; the second waits for room (or the first raises)
                    handoff.send(b"x")
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, send_all)
            await anyio.sleep(0.1)
            handoff.stop()
            stopped.set()
        return outcome[0]

    assert isinstance(asyncio.run(main()), Aborted)


def test_a_cancelled_receiver_that_stops_lets_the_thread_end() -> None:
    async def main() -> list[int]:
        handoff = Handoff[int](1)
        sent: list[int] = []

        def send_all() -> None:
            try:
                for item in range(100):
                    handoff.send(item)
                    sent.append(item)
            except Aborted:
                pass

        async def receive() -> None:
            try:
                async for _ in handoff:
                    await anyio.sleep(10)
            finally:
                handoff.stop()

        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, send_all)
            with anyio.move_on_after(0.2):
                await receive()
        return sent

    assert asyncio.run(main()) == [0, 1]  # one taken by the receiver, one waiting: then it stopped


def test_the_hand_off_works_where_the_loop_is_not_asyncios(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another backend (trio) has no asyncio loop: the thread wakes the task through anyio's portal.
    def no_asyncio_loop() -> asyncio.AbstractEventLoop:
        raise RuntimeError("no running event loop")

    async def main() -> list[int]:
        with monkeypatch.context() as patch:
            patch.setattr(asyncio, "get_running_loop", no_asyncio_loop)
            handoff = Handoff[int](1)
        assert handoff._wake is anyio.from_thread.run_sync
        received: list[int] = []

        async with anyio.create_task_group() as group:
            group.start_soon(_send_then_end, handoff, range(50))
            async for item in handoff:
                received.append(item)
        return received

    assert anyio.run(main) == list(range(50))


def test_a_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1, got 0"):
        Handoff[int](0)
