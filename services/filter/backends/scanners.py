"""The scanner clients one filter worker uses, built from settings and closed together."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from common.settings import Settings
from services.filter.backends.clamd import ClamdClient
from services.filter.backends.rspamd import RspamdClient
from services.filter.backends.spamd import SpamdClient

SPAM_BACKENDS = ("rspamd", "spamassassin", "off")
VIRUS_BACKENDS = ("clamd", "off")


@dataclass
class Scanners:
    spam: RspamdClient | SpamdClient | None = None
    virus: ClamdClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Scanners:
        if settings.spam not in SPAM_BACKENDS:
            raise ValueError(f"TIERMAIL_SPAM must be one of {', '.join(SPAM_BACKENDS)}")
        if settings.virus not in VIRUS_BACKENDS:
            raise ValueError(f"TIERMAIL_VIRUS must be one of {', '.join(VIRUS_BACKENDS)}")
        spam: RspamdClient | SpamdClient | None = None
        if settings.spam == "rspamd":
            spam = RspamdClient(settings.rspamd_url, settings.scan_timeout, settings.hostname)
        elif settings.spam == "spamassassin":
            spam = SpamdClient(settings.spamd_address, settings.scan_timeout)
        virus = None
        if settings.virus == "clamd":
            virus = ClamdClient(settings.clamd_address, settings.scan_timeout,
                                settings.clamd_stream_max)
        return cls(spam, virus)

    @property
    def enabled(self) -> bool:
        return self.spam is not None or self.virus is not None

    @property
    def clients(self) -> list[RspamdClient | SpamdClient | ClamdClient]:
        return [c for c in (self.virus, self.spam) if c is not None]

    async def unavailable(self) -> list[str]:
        """Names of the configured scanners that do not answer a ping now."""
        clients = self.clients
        answers = await asyncio.gather(*(c.ping() for c in clients))
        return [c.name for c, ok in zip(clients, answers, strict=True) if not ok]

    def down(self) -> dict[str, float]:
        """Scanner name -> since when it has not answered (time.time()), for those whose
        last call failed."""
        return {c.name: c.availability.down_since for c in self.clients
                if c.availability.down_since is not None}

    def failing(self) -> dict[str, float]:
        """Scanner name -> since when its scans have failed, for those that answer pings
        (down() has the others): no scan has passed since."""
        return {c.name: since for c in self.clients
                if (since := c.availability.scans_failing_since) is not None
                and c.availability.down_since is None}

    async def ping_down(self) -> None:
        """Ping the scanners whose last call failed, so that one that answers again is
        seen as up even while no mail comes to scan."""
        await asyncio.gather(*(c.ping() for c in self.clients
                               if c.availability.down_since is not None))

    async def aclose(self) -> None:
        for client in (self.spam, self.virus):
            if client is not None:
                await client.aclose()
