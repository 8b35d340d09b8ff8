"""Keeping reads on the writer: `use_writer()`, for code that must read what
it just wrote while `DBHA["READS"]` sends reads to replicas."""

from __future__ import annotations

from contextlib import ContextDecorator
from contextvars import ContextVar, Token
from types import TracebackType

from dbha import _core

#: How many `use_writer()` blocks are open in this context (thread or task);
#: the router reads it.
USE_WRITER: ContextVar[int] = ContextVar("dbha_use_writer", default=0)


class use_writer(ContextDecorator):
    """Pins reads to the writer: a context manager and a decorator.

    ContextVar-based, so it is correct per thread and per asyncio task::

        with dbha.use_writer():
            order = Order.objects.get(pk=pk)  # reads from the writer

        @dbha.use_writer()
        def checkout(request): ...
    """

    def __init__(self) -> None:
        self._tokens: list[Token[int]] = []

    def _recreate_cm(self) -> use_writer:
        # A decorated function may run in several threads at once: each call
        # gets its own context manager.
        return type(self)()

    def __enter__(self) -> use_writer:
        self._tokens.append(USE_WRITER.set(USE_WRITER.get() + 1))
        _core.count_writer_pin(True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        USE_WRITER.reset(self._tokens.pop())
        _core.count_writer_pin(False)
