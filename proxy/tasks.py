"""Background tasks of plugins: one way to stop them."""
from __future__ import annotations

import asyncio

__all__ = ["stop_task"]


async def stop_task(task: "asyncio.Task[object] | None", timeout: float = 5.0) -> None:
    """Cancel a background task (if any) and wait, bounded, until it has ended; its exceptions are not raised.

    The cancellation is repeated until the task ends: before Python 3.12, ``asyncio.wait_for`` inside the task
    can swallow a cancellation that arrives just as its inner await completes, and a single ``cancel()`` then
    leaves a polling loop running forever.
    """
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so it is not reported as never retrieved
