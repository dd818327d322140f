"""LISTEN/NOTIFY: one listener connection per API process, fanned out to in-process waiters.

Notifications are hints: every waiter also has a timeout and re-checks the database, so a missed
notification (the listener reconnecting, say) costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

from services.run_api.store.events import CHANNEL_CANCEL, CHANNEL_EVENTS, CHANNEL_QUEUED, CHANNEL_WORKER

log = logging.getLogger(__name__)


class Waiter:
    """A subscription to one key; `wait()` returns once the key was notified since the last wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def wake(self) -> None:
        """Mark notified."""
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when notified, False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True


class Hub:
    """In-process fan-out of notifications by (channel, payload) key."""

    def __init__(self) -> None:
        self._waiters: dict[tuple[str, str], set[Waiter]] = defaultdict(set)

    @contextmanager
    def subscribe(self, *keys: tuple[str, str]) -> Iterator[Waiter]:
        """A waiter woken by any of `keys` while the block runs."""
        waiter = Waiter()
        for key in keys:
            self._waiters[key].add(waiter)
        try:
            yield waiter
        finally:
            for key in keys:
                group = self._waiters.get(key)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._waiters[key]

    def publish(self, channel: str, payload: str) -> None:
        """Wake the waiters of one key."""
        for waiter in list(self._waiters.get((channel, payload), ())):
            waiter.wake()

    def wake_all(self) -> None:
        """Wake everyone (after a reconnect, when notifications may have been missed)."""
        for group in list(self._waiters.values()):
            for waiter in list(group):
                waiter.wake()


@dataclass(frozen=True)
class ListenerConfig:
    """Where to listen and how to reconnect."""

    conninfo: str
    reconnect_min_seconds: float = 0.1
    reconnect_max_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.reconnect_min_seconds <= 0 or self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError("reconnect delays must be positive and min <= max")


class Listener:
    """The process's one LISTEN connection; reconnects by itself with TCP keepalives on."""

    CHANNELS = (CHANNEL_EVENTS, CHANNEL_QUEUED, CHANNEL_WORKER, CHANNEL_CANCEL)

    def __init__(self, config: ListenerConfig, hub: Hub) -> None:
        self.config = config
        self.hub = hub
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop` is set, reconnecting with backoff."""
        delay = self.config.reconnect_min_seconds
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.config.conninfo,
                    autocommit=True,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                    connect_timeout=5,
                )
            except psycopg.Error as err:
                log.warning("listener cannot connect (%s); retrying in %.1fs", type(err).__name__, delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, self.config.reconnect_max_seconds)
                continue
            try:
                async with conn:
                    for channel in self.CHANNELS:
                        await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                    delay = self.config.reconnect_min_seconds
                    self.connected.set()
                    self.hub.wake_all()  # anything sent while we were away is re-checked
                    while not stop.is_set():
                        async for note in conn.notifies(timeout=0.5):
                            self.hub.publish(note.channel, note.payload)
                        if conn.closed:
                            break
            except psycopg.Error as err:
                log.warning("listener connection lost (%s); reconnecting", type(err).__name__)
            finally:
                self.connected.clear()
            if not stop.is_set():
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, self.config.reconnect_max_seconds)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
