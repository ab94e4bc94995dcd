"""Short commands first: long IMAP commands take turns, one at a time.

All sessions share one event loop. Served first come first served, twenty busy clients make
every command wait behind everyone else's, a NOOP behind a SELECT of 100,000 messages: the
median command then takes twenty times the average command's time. An operating system
serving one process per session (Dovecot) does better for short commands by nature: a
process that just woke up with little to do preempts the long-running ones.

The same here, by the command's expected size: a *long* command (SELECT/EXAMINE, SEARCH,
SORT, THREAD, EXPUNGE, or FETCH/STORE/COPY/MOVE over more than LONG_SET messages) waits for
the long lane, which one long command holds at a time; everything else runs at once. Long
commands yield to the loop between chunks (FETCH, STORE), so short ones are served in
between, and long commands as a whole lose nothing: they use the same CPU one after another
instead of side by side. A long command lets the lane go while it waits for its client to
take its output (`LongTurn.outside`): a slow or stalled reader holds up nobody else.

Between its steps (a SELECT's reads, a big FETCH's chunks) a long command also lets the short
commands in progress finish first, waiting SHORT_FIRST_WAIT at most, so that under a steady
stream of short commands long ones go slower but never stop. A short command that waits for
its client (IDLE until DONE, AUTHENTICATE for its response) or sits out a failed login's
delay is not in progress meanwhile (`ShortTurn.outside`): one idling client, or one that
never answers AUTHENTICATE's `+`, would otherwise cost every step of every long command the
whole SHORT_FIRST_WAIT.

A long command that has held the lane for LONG_SLICE while others wait for it goes behind
them at its next step: one session's minute-long SEARCH (a short needle scanned through a
mailbox of large messages) must not hold up every other session's SELECT for that minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from services.store.imap.protocol.command import SequenceSet

T = TypeVar("T")

LONG_SET = 500  # messages: a FETCH of flags for 500 takes a few milliseconds
# How long a long command's next step waits for the short commands in progress to finish.
SHORT_FIRST_WAIT = 0.010  # seconds
# How long a long command holds the lane, while others wait, before it lets them go first.
LONG_SLICE = 0.200  # seconds


class CommandLanes:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self.waiting = 0  # long commands waiting for their turn
        self.turns = 0  # turns taken since start (a command takes one, and one more after
        # each wait for its client)
        self._short_running = 0
        self._no_short = asyncio.Event()
        self._no_short.set()

    @contextlib.contextmanager
    def short(self) -> Iterator[ShortTurn]:
        """Around a short command: long ones hold their next step until it is done."""
        turn = ShortTurn(self)
        turn.take()
        try:
            yield turn
        finally:
            turn.give_back()

    @property
    def short_running(self) -> int:
        """Short commands in progress (not waiting for their client)."""
        return self._short_running

    def _short_started(self) -> None:
        self._short_running += 1
        self._no_short.clear()

    def _short_done(self) -> None:
        self._short_running -= 1
        if not self._short_running:
            self._no_short.set()

    async def after_short(self) -> None:
        """Wait until no short command is in progress, SHORT_FIRST_WAIT at most (so a steady
        stream of short commands slows long ones down but never stops them)."""
        if self._short_running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHORT_FIRST_WAIT):
                    await self._no_short.wait()

    @contextlib.asynccontextmanager
    async def long(self) -> AsyncIterator[LongTurn]:
        turn = LongTurn(self, self._clock)
        await turn.take()
        try:
            yield turn
        finally:
            turn.give_back()

    async def _acquire(self) -> None:
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        self.turns += 1

    def _release(self) -> None:
        self._lock.release()


class LongTurn:
    """One long command's hold on the lane. While it waits for the client to take its output
    (`outside`), it lets the lane go: a client that reads slowly, or not at all, must not
    hold up every other session's long commands."""

    def __init__(self, lanes: CommandLanes, clock: Callable[[], float]) -> None:
        self._lanes = lanes
        self._clock = clock
        self._holding = False
        self._taken_at = 0.0

    async def take(self) -> None:
        await self._lanes._acquire()
        self._holding = True
        self._taken_at = self._clock()
        await self._lanes.after_short()

    async def step(self) -> None:
        """Between two steps of a long command: short commands first, and the long ones
        waiting for the lane once this one has had it for LONG_SLICE."""
        if self._lanes.waiting and self._clock() - self._taken_at >= LONG_SLICE:
            self.give_back()
            await self.take()  # asyncio.Lock is first come, first served: behind them
            return
        await self._lanes.after_short()

    def give_back(self) -> None:
        if self._holding:
            self._holding = False
            self._lanes._release()

    async def outside(self, waiting: Awaitable[T]) -> T:
        self.give_back()
        try:
            return await waiting
        finally:
            await self.take()


class ShortTurn:
    """One short command's place among those in progress, left while it waits for its client
    or a delay (`outside`)."""

    def __init__(self, lanes: CommandLanes) -> None:
        self._lanes = lanes
        self._holding = False

    def take(self) -> None:
        if not self._holding:
            self._holding = True
            self._lanes._short_started()

    def give_back(self) -> None:
        if self._holding:
            self._holding = False
            self._lanes._short_done()

    async def outside(self, waiting: Awaitable[T]) -> T:
        self.give_back()
        try:
            return await waiting
        finally:
            self.take()


def set_size(sequence: SequenceSet, count: int, uid: bool, uidnext: int) -> int:
    """How many messages `sequence` can cover in a mailbox of `count` messages (an estimate
    for UID sets: a UID range covers at most the messages that exist)."""
    top = uidnext - 1 if uid else count
    total = 0
    for low, high in sequence.ranges:
        first = top if low is None else low
        last = top if high is None else high
        first, last = min(first, last), max(first, last)
        total += max(0, min(last, top) - first + 1)
    return min(total, count)
