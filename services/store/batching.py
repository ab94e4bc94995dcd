"""When the delivery consumer waits for a fuller batch (services/store/consumer.py, _gather).

A batch costs one index commit (an fsync), one hand-over to the writer thread and one ack
whatever its size, so under load the consumer waits up to TIERMAIL_STORE_BATCH_WAIT for a
batch of BATCH_TARGET messages. That pays only while messages arrive fast enough to fill the
batch within the wait. At a slower pace the batch never fills: each one waited out the whole
wait, and the messages that arrived meanwhile made the next batch wait again, so every
message of a steady moderate stream was stored 20 ms late instead of 2 ms. `ArrivalPace`
says whether the last BATCH_TARGET arrivals came within one wait: only then is it worth
waiting.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class ArrivalPace:
    def __init__(self, batch: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._recent: deque[float] = deque(maxlen=batch)  # the last `batch` arrival times

    def arrived(self) -> None:
        self._recent.append(self._clock())

    def fills_batch(self) -> bool:
        """Whether the last `batch` messages all arrived within the last `window` seconds."""
        recent = self._recent
        return len(recent) == recent.maxlen and recent[0] >= self._clock() - self._window
