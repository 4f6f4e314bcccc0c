"""Background tasks of plugins: one way to stop them."""
from __future__ import annotations

import asyncio

__all__ = ["stop_task"]


async def stop_task(task: "asyncio.Task[object] | None") -> None:
    """Cancel a background task (if any) and wait until it has ended; its exceptions are not raised."""
    if task is None:
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
