"""The tests' TcpProxy (tests/support.py): a cut must take every relayed connection away,
also one the proxy was still opening upstream when the cut came; a hang passes nothing on,
not even the end of the stream."""

from __future__ import annotations

import socket
import time

from tests.support import TcpProxy, wait_until


def test_a_connection_being_opened_at_the_cut_is_cut_too() -> None:
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(0)  # never accepted until the end: its accept queue fills
    port = target.getsockname()[1]
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(1)]
    proxy = TcpProxy(port)
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    try:
        # The proxy has accepted `client` and waits for the target to take its connection
        # (the kernel drops its SYNs while the accept queue is full; it retries after 1 s).
        time.sleep(0.3)  # a moment for the proxy's connect to be under way, not a wait
        proxy.cut()
        accepted = []
        target.settimeout(30)
        while len(accepted) < 2:  # the filler, then the proxy's upstream connection
            accepted.append(target.accept()[0])
        upstream = accepted[1]
        upstream.settimeout(5)
        client.sendall(b"after the cut\r\n")
        # Cut: the client's bytes never reach the target, and both ends are closed.
        got = b""
        try:
            got = upstream.recv(100)
        except (TimeoutError, OSError):
            pass
        assert got == b"", f"relayed after the cut: {got!r}"
        client.settimeout(5)
        wait_until(lambda: _closed(client), timeout=10, what="the client's end closed")
    finally:
        proxy.cut()
        client.close()
        for sock in waiting:
            sock.close()
        target.close()


def test_a_hung_proxy_holds_back_the_end_of_the_stream_too() -> None:
    """RabbitMQ closes a connection that stays silent past its handshake timeout: passed on
    while hung, the close told the client what a frozen broker never would (pika's own
    handshake timeout was never reached)."""
    target = socket.create_server(("127.0.0.1", 0))
    proxy = TcpProxy(target.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    try:
        target.settimeout(30)
        upstream, _ = target.accept()
        proxy.hang()
        upstream.close()  # the target gives up on its silent client
        client.settimeout(1)
        try:
            got: bytes | None = client.recv(100)
        except TimeoutError:
            got = None
        assert got is None, "the end of the stream went through a hung proxy"
        proxy.resume()
        client.settimeout(5)
        wait_until(lambda: _closed(client), timeout=10, what="the end passed on once resumed")
    finally:
        proxy.cut()
        client.close()
        target.close()


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
