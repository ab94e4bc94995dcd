"""Scanner clients (rspamd, clamd, spamd): I/O only; the wire formats live in protocol/,
the verdicts in rules/."""

from services.filter.backends.errors import ScannerUnavailable, StreamTooLarge

__all__ = ["ScannerUnavailable", "StreamTooLarge"]
