"""IMAP4rev1 grammar and formatting (RFC 3501 section 9 and extensions): pure, no I/O.

The server feeds bytes to `parser.CommandParser`, which answers with a command, "need more
bytes" or "need a literal of n octets"; `grammar` turns a complete command into the typed
values of `command`; `wire` formats responses; `mime` computes ENVELOPE, BODYSTRUCTURE and body
sections of stored messages.
"""
