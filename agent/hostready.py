"""Whole-host drain for load balancers: `zdd-agent drain-host` and
`undrain-host` flip a readiness endpoint that the daemon serves (GET /ready:
200 "ready", or 503 "draining"), so an upstream HAProxy, NGINX or cloud load
balancer health check takes the host out of rotation before maintenance and
puts it back after.

The state is a file in the state directory, written atomically and read by
the endpoint on each request: it survives a daemon restart or a reboot (a
host drained for maintenance stays out until someone undrains it), and a
`--local` CLI that writes it is seen at once."""

from __future__ import annotations

import io
import ipaddress
import json
import math
import re
import socket
import ssl
import syslog
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .fsutil import atomic_write
from .log import log

if TYPE_CHECKING:
    from .config import AgentConfig

STATE_FILE = "host.json"
MAX_REASON = 200

# Limits of the endpoint, which a root daemon serves to whole networks: a
# client has REQUEST_TIMEOUT seconds in all for the TLS handshake and the
# request; at most MAX_CONNECTIONS are served at once (a thread each), at most
# MAX_PER_PEER of them from one address, so that one slow or hostile peer
# cannot take the slots the load balancers' checks need (against many peers,
# allow_from); beyond that a new connection is closed at once. A load
# balancer's "GET /ready HTTP/1.1" with a Host header is under 100 bytes;
# http.server alone would take 65536-byte lines and 100 headers.
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
MAX_PER_PEER = 8
MAX_LINE = 2048
MAX_HEAD = 8192

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def read(state_dir: Path) -> dict[str, Any]:
    """{"drained": bool, "since": epoch or None, "reason": str}; a missing or
    unreadable file means in rotation (the safe default after a fresh install)."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
        return {"drained": bool(data["drained"]), "since": data.get("since"),
                "reason": str(data.get("reason", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return {"drained": False, "since": None, "reason": ""}


def set_drained(state_dir: Path, drained: bool, reason: str = "") -> dict[str, Any]:
    """Drain or undrain; the result says whether anything changed."""
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise ValueError(f"the reason must be printable and at most {MAX_REASON} characters")
    before = read(state_dir)
    if before["drained"] == drained:
        return {**before, "changed": False}
    now = {"drained": drained, "since": round(time.time(), 3), "reason": reason}
    # like the other state files: root and the state directory's group (the
    # admin group, state.secure_state_dir)
    group = state_dir.stat().st_gid if state_dir.is_dir() else None
    atomic_write(state_dir / STATE_FILE, json.dumps(now) + "\n", 0o640, group)
    return {**now, "changed": True}


class HeadTooLarge(Exception):
    """The request line or the headers are over their limit; `code` is the answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def read_head(sock: socket.socket, timeout: float, max_line: int = MAX_LINE,
              max_head: int = MAX_HEAD) -> bytes:
    """The request line and headers of one request, through the blank line that
    ends them, read within `timeout` seconds in all: a client that sends a byte
    a second gets no more time than one that sends nothing (the slow-loris
    case; a plain socket timeout restarts at every byte).

    Raises TimeoutError; HeadTooLarge(414) for a request line over `max_line`
    bytes, HeadTooLarge(431) for a head over `max_head` bytes; EOFError when
    the peer closes first (a TCP health check that only connects)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:  # each turn adds at least a byte, and buf stays under max_head + 4096
        line_end = buf.find(b"\n")
        if (line_end if line_end >= 0 else len(buf)) > max_line:
            raise HeadTooLarge(414, f"request line over {max_line} bytes")
        end = _HEAD_END.search(buf)
        if (end.end() if end else len(buf)) > max_head:
            raise HeadTooLarge(431, f"request headers over {max_head} bytes")
        if end:
            return buf[:end.end()]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete request within {timeout:g} s")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("peer closed before a complete request")
        buf += chunk


def peer_address(client_address: Any) -> IPAddress:
    """The peer's IP address, an IPv4-mapped IPv6 peer (::ffff:a.b.c.d, what an
    IPv6 socket reports for an IPv4 client) as the IPv4 address it carries."""
    ip = ipaddress.ip_address(client_address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def allowed(ip: IPAddress, allow_from: Sequence[IPNetwork]) -> bool:
    """Whether `ip` (as peer_address gives it) is in one of the networks; an
    empty sequence allows every peer. An IPv4 peer also matches an IPv4-mapped
    IPv6 network (::ffff:10.0.0.0/104)."""
    if not allow_from:
        return True
    forms: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv4Address):
        forms.append(ipaddress.IPv6Address(f"::ffff:{ip}"))
    return any(f in net for f in forms for net in allow_from)


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) with this certificate chain and
    key, both PEM files; with `client_ca` (PEM), a client must present a
    certificate that CA signed (ssl.CERT_REQUIRED: mutual TLS).
    Raises OSError for a file it cannot read, ssl.SSLError for one it cannot
    use (a key that does not match the certificate, a file that is not PEM)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# Reasons a connection is closed without a normal answer, as RefusalLog counts them
BUSY = "over the connection limit"
PEER_BUSY = "over the per-peer limit"
NOT_ALLOWED = "not in allow_from"
TIMED_OUT = "timed out"
TLS_FAILED = "failed the TLS handshake"
BAD_REQUEST = "with a bad request"


class RefusalLog:
    """Counts refused connections by reason and logs at most one line per
    `interval` seconds (the first at once, later ones with the counts since
    the last line), so that a flood of refusals cannot flood the journal.
    Counts still pending when the refusals stop are logged by flush().
    `totals` counts every refusal since the start, by reason."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None) -> None:
        self.interval, self.clock = interval, clock
        self.emit = emit or (lambda line: log("daemon", line, syslog.LOG_WARNING))
        self.totals: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._since = 0.0  # when the first pending refusal came
        self._last = -math.inf  # when the last line went out
        self._lock = threading.Lock()

    def note(self, reason: str) -> None:
        with self._lock:
            now = self.clock()
            self.totals[reason] += 1
            if not self._pending:
                self._since = now
            self._pending[reason] += 1
            line = self._take(now) if now - self._last >= self.interval else None
        if line:
            self.emit(line)

    def flush(self) -> None:
        with self._lock:
            line = self._take(self.clock()) if self._pending else None
        if line:
            self.emit(line)

    def _take(self, now: float) -> str:
        n = sum(self._pending.values())
        parts = ", ".join(f"{c} {r}" for r, c in self._pending.most_common())
        self._pending.clear()
        self._last = now
        return (f"host_ready: refused {n} connection{'s' if n != 1 else ''} in "
                f"{now - self._since:.1f} s ({parts})")


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0: no keep-alive), GET or HEAD
    (http.server answers other methods 501). The head is read under the
    connection's deadline and size limits first, then parsed by http.server."""

    server_version = "zdd-agent"
    # a request line without a version (HTTP/0.9) still gets a status line and
    # headers, also with an error
    default_request_version = "HTTP/1.0"
    state_dir: Path  # set on the subclass the server makes
    server: _Server

    def handle(self) -> None:
        self.close_connection = True
        try:
            head = read_head(self.connection, self.server.time_left(), MAX_LINE, MAX_HEAD)
        except HeadTooLarge as e:
            # what http.server sets before its own 414, so send_error can answer
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(e.code, e.message)
            return
        except EOFError:
            return
        self.rfile.close()  # the socket's reader, unused: the head is read
        self.rfile = io.BytesIO(head)
        self.connection.settimeout(max(self.server.time_left(), 0.1))  # for the answer
        self.handle_one_request()

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        self.server.refusals.note(BAD_REQUEST)
        super().send_error(code, message, explain)

    def _answer(self, body: bool) -> None:
        if self.path.split("?")[0] not in ("/ready", "/"):
            code, text = 404, "not found: GET /ready\n"
        else:
            st = read(self.state_dir)
            if st["drained"]:
                reason = f": {st['reason']}" if st["reason"] else ""
                code, text = 503, f"draining since {st['since']}{reason}\n"
            else:
                code, text = 200, "ready\n"
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # health checks every second would flood the journal; RefusalLog counts


class _Server(ThreadingHTTPServer):
    """The accept loop (serve_forever's thread) only filters and counts: a
    peer outside allow_from, or one over the limits, is closed there at once,
    before any byte is read. Everything that waits on the client (the TLS
    handshake, the request) runs in the connection's own thread, under the
    connection's deadline."""

    daemon_threads = True
    # The kernel's accept queue (listen(2) backlog, capped by net.core.somaxconn).
    # A connection that finds it full waits for the SYN-ACK retransmit, 1 s: a
    # burst of clients must not cost a load balancer's check that second.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[_Handler], *,
                 tls: ssl.SSLContext | None, allow_from: Sequence[IPNetwork],
                 max_connections: int, max_per_peer: int, request_timeout: float,
                 refusals: RefusalLog) -> None:
        self.tls, self.allow_from = tls, tuple(allow_from)
        self.max_connections, self.max_per_peer = max_connections, max_per_peer
        self.request_timeout, self.refusals = request_timeout, refusals
        self.active: Counter[str] = Counter()  # connections being served, by peer
        self.peak = 0  # the most served at once since the start
        self._lock = threading.Lock()
        self._deadline = threading.local()
        super().__init__(address, handler)

    def time_left(self) -> float:
        """Seconds left to the current connection's deadline (its thread's)."""
        return float(self._deadline.at - time.monotonic())

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if allowed(peer_address(client_address), self.allow_from):
            return True
        self.refusals.note(NOT_ALLOWED)
        return False  # socketserver closes it unanswered

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(peer_address(client_address))
        with self._lock:
            total = sum(self.active.values())
            refused = (BUSY if total >= self.max_connections
                       else PEER_BUSY if self.active[peer] >= self.max_per_peer else None)
            if refused is None:
                self.active[peer] += 1
                self.peak = max(self.peak, total + 1)
        if refused is not None:
            self.refusals.note(refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release(peer)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(peer_address(client_address)))

    def _release(self, peer: str) -> None:
        with self._lock:
            self.active[peer] -= 1
            if self.active[peer] <= 0:
                del self.active[peer]

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake, then the request."""
        self._deadline.at = time.monotonic() + self.request_timeout
        request.settimeout(self.request_timeout)
        conn = request
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(request, server_side=True,
                                            do_handshake_on_connect=False)
                conn.do_handshake()  # bounded by the socket timeout set above
            super().finish_request(conn, client_address)
        except TimeoutError:
            self.refusals.note(TIMED_OUT)
        except ssl.SSLError:
            self.refusals.note(TLS_FAILED)  # no or a wrong client certificate, not TLS
        except OSError:
            pass  # the peer reset or went away: nobody to answer
        finally:
            if conn is not request:
                conn.close()  # wrap_socket moved the descriptor to conn

    def handle_error(self, request: Any, client_address: Any) -> None:
        log("daemon", f"host_ready: error serving {client_address[0]}", syslog.LOG_ERR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class ReadyServer:
    """GET /ready on `host`:`port` (port 0: any free one), in a thread;
    stop() closes it, after the connections being served end (each within
    `request_timeout` seconds). `tls`: a server_context(); `allow_from`: the
    networks a peer must be in (empty: any); the limits are the module's
    constants unless given (tests use small ones)."""

    def __init__(self, host: str, port: int, state_dir: Path, *,
                 tls: ssl.SSLContext | None = None, allow_from: Sequence[IPNetwork] = (),
                 max_connections: int = MAX_CONNECTIONS, max_per_peer: int = MAX_PER_PEER,
                 request_timeout: float = REQUEST_TIMEOUT,
                 refusals: RefusalLog | None = None) -> None:
        handler = type("Handler", (_Handler,), {"state_dir": state_dir})
        server = _Server6 if ":" in host else _Server
        self.refusals = refusals or RefusalLog()
        self.httpd = server((host, port), handler, tls=tls, allow_from=allow_from,
                            max_connections=max_connections, max_per_peer=max_per_peer,
                            request_timeout=request_timeout, refusals=self.refusals)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="host-ready",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def active(self) -> int:
        """Connections being served now (each one thread)."""
        with self.httpd._lock:
            return sum(self.httpd.active.values())

    def start(self) -> ReadyServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.refusals.flush()


def from_config(agent: AgentConfig, state_dir: Path) -> ReadyServer:
    """The server agent.yaml's host_ready section describes (listen must be set),
    not started. Raises ConfigError when a TLS file stopped loading since the
    config was checked, OSError when the address cannot be bound."""
    from .metrics import parse_listen

    assert agent.host_ready_listen is not None
    host, port = parse_listen(agent.host_ready_listen, "host_ready.listen", loopback=False)
    tls = None
    if agent.host_ready_tls is not None:
        t = agent.host_ready_tls
        try:
            tls = server_context(t.cert, t.key, t.client_ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"host_ready.tls: cannot load {t.cert}, {t.key}: {e}",
                              key="host_ready.tls") from None
    return ReadyServer(host, port, state_dir, tls=tls, allow_from=agent.host_ready_allow_from)
