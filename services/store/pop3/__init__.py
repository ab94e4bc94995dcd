"""POP3 for the store tier.

protocol.py: the pure grammar (no asyncio, no I/O); session.py: the state machine and the one
command table; locks.py: the per-store maildrop lock registry; server.py: the listeners
(`start_pop3_servers`). Kept free of imports so the pure parser can be imported on its own.
"""
