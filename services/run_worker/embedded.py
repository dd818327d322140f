"""The opt-in worker inside the API process (RUN_WORKER_EMBEDDED=true).

It reuses Worker.run_cycle, the same code as `--once`, over a gRPC channel to its own server.
Cycles never overlap: one ends before the next starts, woken by a queued-run notification or
the poll interval. Stopped mid-cycle, its runs get RUN_WORKER_DRAIN_SECONDS to finish (logged as
draining), then the rest are released back to the queue, as a worker process does; a second
Ctrl-C or SIGTERM to the API releases them at once (release_held_runs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc

from services.run_worker.worker import Worker
from shared.settings import WorkerSettings

log = logging.getLogger(__name__)

CHANNEL_QUEUED = "runs_queued"
# The embedded worker's key belongs to tenant "default": it is woken by that tenant's queued runs.
TENANT = "default"

# The embedded workers running in this process (one per API server), for release_held_runs.
_RUNNING: set[Worker] = set()


def release_held_runs() -> None:
    """A second Ctrl-C to the API: its embedded worker gives its runs back at once instead of draining."""
    for worker in _RUNNING:
        worker.release_now.set()


class _Waiter(Protocol):
    async def wait(self, timeout: float) -> bool: ...


class _Hub(Protocol):
    def subscribe(self, *keys: tuple[str, str]) -> object: ...


class EmbeddedWorker:
    """Runs claim cycles in the API process until stopped."""

    def __init__(self, settings: WorkerSettings, hub: _Hub) -> None:
        self.settings = settings
        self.hub = hub
        self.cycles = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Cycle until `stop` is set; the current cycle always finishes first."""
        worker = Worker(self.settings)
        log.info("embedded worker started", extra={"worker_id": self.settings.worker_id})
        _RUNNING.add(worker)
        try:
            with self.hub.subscribe((CHANNEL_QUEUED, f"{TENANT}/{self.settings.workspace_id}")) as waiter:  # type: ignore[attr-defined]
                while not stop.is_set():
                    cycle = asyncio.create_task(worker.run_cycle())
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait([cycle, stopped], return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if not cycle.done():  # stopping mid-cycle: the runs get the drain time, then go back
                        await worker.drain()
                    try:
                        counters = await cycle
                    except grpc.aio.AioRpcError as err:
                        log.warning("embedded worker cycle failed: %s", err.code().name)
                        counters = None
                    self.cycles += 1
                    if counters and counters["claimed"]:
                        continue  # more may be due right away
                    wait = asyncio.create_task(waiter.wait(self.settings.poll_ms / 1000))
                    stopped = asyncio.create_task(stop.wait())
                    await asyncio.wait([wait, stopped], return_when=asyncio.FIRST_COMPLETED)
                    wait.cancel()
                    stopped.cancel()
        finally:
            _RUNNING.discard(worker)
            await worker.close()
            log.info("embedded worker stopped")
