"""Password checks for the store's own protocols (POP3, IMAP) and, later, for SMTP AUTH.

argon2 is deliberately slow (~100 ms); it runs in a worker thread so one login never stalls
the event loop. An unknown user costs the same as a wrong password, so timing does not tell
which accounts exist.
"""

from __future__ import annotations

import asyncio

from common.passwords import hash_password, verify_password
from services.store.backends.accounts import AccountDB

_DUMMY_HASH = hash_password("tiermail: no such user")


def check_password(accounts: AccountDB, address: str, password: str) -> bool:
    stored = accounts.password_hash(address)
    if stored is None:
        verify_password(_DUMMY_HASH, password)
        return False
    return verify_password(stored, password)


async def authenticate(accounts: AccountDB, address: str, password: str) -> bool:
    return await asyncio.to_thread(check_password, accounts, address, password)
