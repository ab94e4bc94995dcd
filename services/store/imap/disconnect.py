"""The one way an IMAP connection ends from inside a command or the channel."""

from __future__ import annotations


class Disconnect(Exception):
    """Raised by the Channel when the connection ends (reason: "eof", "timeout" (idle),
    "login deadline", "write stall" (the client took none of a response), "lost", "tls",
    "compression", "ended": the session was ended from outside, its account deleted), and by a
    command that cannot finish a response it has begun ("storage"); the session lets it
    through to the server, which closes the connection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
