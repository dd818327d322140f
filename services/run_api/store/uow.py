"""Unit of work: one database transaction; leaving the block without commit() rolls back."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction


class UnitOfWork:
    """`async with UnitOfWork(engine) as uow: ... await uow.commit()`.

    `autocommit=True`: no transaction around the statements, each commits by itself (for work that is
    one statement, such as a claim: it saves the BEGIN and COMMIT round trips); commit() does nothing.
    """

    def __init__(self, engine: AsyncEngine, autocommit: bool = False) -> None:
        self._engine = engine
        self._autocommit = autocommit
        self._conn: AsyncConnection | None = None
        self._tx: AsyncTransaction | None = None

    @property
    def conn(self) -> AsyncConnection:
        """The connection of the open transaction."""
        if self._conn is None:
            raise RuntimeError("unit of work is not open")
        return self._conn

    async def __aenter__(self) -> UnitOfWork:
        self._conn = await self._engine.connect()
        try:
            if self._autocommit:
                self._conn = await self._conn.execution_options(isolation_level="AUTOCOMMIT")
                return self
            self._tx = await self._conn.begin()
        except BaseException:
            await self._conn.close()
            raise
        return self

    async def commit(self) -> None:
        """Commit the transaction."""
        if self._tx is not None:
            await self._tx.commit()
            self._tx = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Any:
        try:
            if self._tx is not None and self._tx.is_active:
                await self._tx.rollback()
        except Exception:
            if exc is None:
                raise
        finally:
            self._tx = None
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
        return None
