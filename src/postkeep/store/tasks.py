"""Background steps a caller's cancellation must not interrupt (both group-commit writers).

A writer that has admitted a transaction into a batch must end it exactly once, even if
the caller awaiting it is cancelled: it runs those steps as tasks of a ``Tasks`` set and
awaits them through ``asyncio.shield``. The set keeps strong references until each task
is done (the event loop keeps only weak ones), and ``wait()`` lets ``close()`` wait for all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from postkeep.store.api import StorageError

T = TypeVar("T")


class Tasks:
    def __init__(self, log: logging.Logger, event: str) -> None:
        self._log = log
        self._event = event
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # A shielded task whose caller was cancelled has nobody to take its outcome. A
        # StorageError is the batch's expected failure, already handled; anything else is
        # a bug worth a log line rather than asyncio's "exception was never retrieved".
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, StorageError):
                self._log.error(self._event, exc_info=exc)

    async def wait(self) -> None:
        """Until every task, including those spawned meanwhile, is done."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
