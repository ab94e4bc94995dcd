"""COMPRESS=DEFLATE (RFC 4978): after the tagged OK both directions are raw DEFLATE streams,
over plain TCP and under TLS, until the connection ends."""

from __future__ import annotations

import tracemalloc
import zlib

from common.settings import Settings
from services.store.imap import responses as r
from tests.integration.imap.clients import Raw, in_thread, message
from tests.integration.imap.conftest import ALICE, USERS, Deliver, ImapStack, StartImap


def logged_in(stack: ImapStack, *, tls: bool = False) -> Raw:
    raw = Raw.connect(stack.tls_port if tls else stack.port, tls=tls)
    raw.ok(f'LOGIN {ALICE} "{USERS[ALICE]}"')
    return raw


async def test_commands_and_responses_travel_deflated(imap_server: ImapStack,
                                                      deliver: Deliver) -> None:
    big = message("big", "".join(f"line {n} of a long text\r\n" for n in range(20_000)))
    await deliver(ALICE, big)

    def dialog(tls: bool) -> None:
        raw = Raw.connect(imap_server.tls_port if tls else imap_server.port, tls=tls)
        before = raw.ok("CAPABILITY").untagged[0]
        assert b"COMPRESS=DEFLATE" not in before  # a command of the authenticated state
        assert raw.command("COMPRESS DEFLATE").status == "BAD"
        raw.ok(f'LOGIN {ALICE} "{USERS[ALICE]}"')
        assert b"COMPRESS=DEFLATE" in raw.ok("CAPABILITY").untagged[0]
        assert raw.command("COMPRESS GZIP").status == "BAD"
        assert raw.compress().text == b"DEFLATE active"
        raw.ok("SELECT INBOX")
        fetched = raw.ok("FETCH 1 BODY.PEEK[]").untagged[0]
        assert fetched.endswith(big + b")")  # 520 KiB: sent from the file, in chunks
        again = raw.command("COMPRESS DEFLATE")  # RFC 4978 3: only once, and NO says why
        assert again.status == "NO" and again.code == b"COMPRESSIONACTIVE", again
        raw.ok("NOOP")
        raw.close()

    await in_thread(lambda: dialog(tls=False))
    await in_thread(lambda: dialog(tls=True))


async def test_the_autologout_bye_arrives_deflated(start_imap: StartImap,
                                                  settings: Settings) -> None:
    """The server's last words to a compressed session (here the autologout) are part of
    the DEFLATE stream too: sent raw, the client's decompressor fails on them and the user
    sees a broken connection instead of the reason."""
    server = await start_imap(settings.replace(imap_timeout=1.5))

    def dialog(tls: bool) -> None:
        raw = logged_in(server, tls=tls)
        raw.compress()
        assert raw.response() + b"\r\n" == r.BYE_TIMEOUT.untagged()  # inflated by Raw
        assert raw.closed()

    await in_thread(lambda: dialog(tls=False))
    await in_thread(lambda: dialog(tls=True))


async def test_compress_pipelined_with_more_is_refused_and_nothing_changes(
        imap_server: ImapStack) -> None:
    def dialog() -> None:
        raw = logged_in(imap_server)
        raw.send(b"c1 COMPRESS DEFLATE\r\nc2 NOOP\r\n")
        refused = raw.reply("c1")
        assert refused.status == "BAD" and b"Wait for the reply" in refused.text
        assert raw.reply("c2").status == "OK"  # still uncompressed
        raw.ok("NOOP")
        raw.close()

    await in_thread(dialog)


async def test_a_deflate_bomb_is_refused_without_inflating_it(imap_server: ImapStack) -> None:
    """50 MiB of one line in about 50 KiB of DEFLATE: the line limit refuses it while the
    server holds a few chunks of it at most, and other sessions go on."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = bomb.compress(b"b1 NOOP " + b"A" * (50 * 1024 * 1024) + b"\r\n")
    payload += bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(payload) < 100_000

    def dialog() -> None:
        raw = logged_in(imap_server)
        raw.compress()
        raw.sock.sendall(payload)  # already deflated: past Raw.send's own compressor
        refused = raw.reply("b1")
        assert refused.status == "BAD" and b"too long" in refused.text, refused
        raw.ok("NOOP")  # the rest of the line was read and dropped, in step
        raw.close()
        other = logged_in(imap_server)
        other.ok("NOOP")
        other.close()

    tracemalloc.start()
    try:
        await in_thread(dialog)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
