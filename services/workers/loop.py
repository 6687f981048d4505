"""The compute thread of a worker: it alone touches the core (engine, pool, KV cache).

The asyncio side never blocks on torch: it submits commands (`call`), which run on the compute
thread between two steps, and receives each step's outputs on the event loop. One thread owns
the core, so the core needs no locks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from disagg.shared.log import get_logger
from disagg.shared.service import BusyError

log = get_logger("disagg.compute")


class ComputeLoop:
    def __init__(
        self,
        step: Callable[[], list],
        has_work: Callable[[], bool],
        on_outputs: Callable[[list], None],
        *,
        on_idle: Callable[[], None] | None = None,
        idle_wait_s: float = 0.05,
        busy_wait_s: float = 0.001,
        max_commands: int = 4096,
    ) -> None:
        """`on_outputs` runs on the event loop with each non-empty step's outputs; `on_idle` on
        the compute thread after each idle wait (commands may have changed the core)."""
        self._step, self._has_work, self._on_outputs = step, has_work, on_outputs
        self._on_idle = on_idle
        self._idle_wait_s, self._busy_wait_s = idle_wait_s, busy_wait_s
        self._commands: queue.Queue = queue.Queue(maxsize=max_commands)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run `fn(*args)` on the compute thread; its exception is raised here.

        BusyError when the command queue is full; TimeoutError after `timeout` (the command may
        still run later: whatever it reserves must have its own bound, e.g. a transfer deadline).
        """
        if self._stop.is_set() or self.failed is not None:
            raise RuntimeError("the compute loop is not running")
        future = self._loop.create_future()
        try:
            self._commands.put_nowait((fn, args, future))
        except queue.Full:
            raise BusyError(f"{self._commands.maxsize} commands queued") from None
        async with asyncio.timeout(timeout):  # not wait_for, which can lose a cancellation
            return await future

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(self._busy_wait_s if self._has_work() else self._idle_wait_s)
                if self._has_work():
                    outputs = self._step()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._on_outputs, outputs)
                elif self._on_idle is not None:
                    self._on_idle()
        except BaseException as err:  # fatal: log the state and let the shell exit non-zero
            self.failed = err
            log.exception("compute_loop_failed")

    def _run_commands(self, wait_s: float) -> None:
        try:
            item = self._commands.get(timeout=wait_s)
        except queue.Empty:
            return
        while True:
            self._run_one(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run_one(self, fn, args, future: asyncio.Future) -> None:
        try:
            result, error = fn(*args), None
        except Exception as err:
            result, error = None, err
        self._loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller timed out
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
