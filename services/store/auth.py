"""Password checks for the store's own protocols (POP3, IMAP) and, later, for SMTP AUTH.

argon2 is deliberately slow (~100 ms); it runs in a worker thread so one login never stalls
the event loop. An unknown user costs the same as a wrong password, so timing does not tell
which accounts exist.
"""

from __future__ import annotations

import asyncio
import functools

from common.passwords import hash_password, verify_password
from services.store.backends.accounts import AccountDB


@functools.cache
def _dummy_hash() -> str:
    """Made on first use, not at import: argon2 costs ~0.1 s on every store start otherwise."""
    return hash_password("tiermail: no such user")


def check_password(accounts: AccountDB, address: str, password: str) -> bool:
    stored = accounts.password_hash(address)
    if stored is None:
        verify_password(_dummy_hash(), password)
        return False
    return verify_password(stored, password)


async def authenticate(accounts: AccountDB, address: str, password: str) -> bool:
    return await asyncio.to_thread(check_password, accounts, address, password)
