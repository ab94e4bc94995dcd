"""Queue ids: one per message, carried through every tier's logs and used for dedup."""

from __future__ import annotations

import base64
import os
import time


def new_queue_id() -> str:
    """A 26-character, time-ordered, unique id (48 bits of milliseconds + 80 random bits).

    Time order makes ids sort by arrival in logs; 80 random bits make collisions between
    filter workers negligible without any coordination.
    """
    millis = int(time.time() * 1000).to_bytes(6, "big")
    raw = millis + os.urandom(10)
    return base64.b32encode(raw).decode().rstrip("=")
