"""WebSocket load against an echo endpoint (the demo ASGI service's /ws,
agent.demo.asgi_api, or any service's with --path), to count what a swap
does to WebSocket clients.

- echo clients: each sends a message on /ws and awaits its echo, in a loop,
  for the whole run; when the connection closes (cleanly with 1000/1001/1012,
  or abnormally: 1006, no close frame, e.g. a reset or the old instance's
  SIGKILL) it reconnects, as a real client would. A message sent but never
  echoed is lost.
- hold clients: each connects to /ws/hold and reads its stream until the end
  of the run. A server that tells them to go (close 1001 Going Away or 1012
  Service Restart, as the drain kit does) is followed to a new connection
  (`moved`); any other end (1006: the agent's kill at the grace period) is
  final: `cut` counts those.
- reconnect time: from a connection's close to the client's next successful
  connect (echo and hold clients alike), as a user would wait for it.

    python -m agent.traffic.ws_client --url ws://127.0.0.1:8080 --clients 16 --hold 3 --seconds 12

`--pause` spaces the echoes (500 clients at the default 20 ms would be
25,000 messages a second); `--ramp` spreads the clients' first connects.

prints one JSON object (with the echo round trips over time: series.py);
`run()` returns it for in-process use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from .series import Series
from websockets.exceptions import ConnectionClosed, WebSocketException

PAUSE = 0.02  # seconds between an echo and the next message (--pause)
RETRY = 0.1  # seconds before a new connect after a failed one
TIMEOUT = 2.0  # seconds for a connect, an echo or a close handshake
ABNORMAL = 1006  # the close code when no close frame arrived (RFC 6455 7.1.5)
GO_AWAY = (1001, 1012)  # Going Away, Service Restart: reconnect (hold clients too)


@dataclass
class Stats:
    sent: int = 0
    echoed: int = 0
    lost: int = 0  # sent, then the connection ended or TIMEOUT passed without its echo
    mismatched: int = 0  # an echo of something else than the message sent
    connects: int = 0
    connect_failures: int = 0
    cut: int = 0  # hold connections that ended abnormally before the end of the run
    moved: int = 0  # hold connections the server closed with 1001/1012, reconnected
    reconnects: list[float] = field(default_factory=list)  # close -> next connect, s
    closed_at: dict[int, float] = field(default_factory=dict)  # client -> its last close
    messages: int = 0  # hold messages received
    closes: Counter[int] = field(default_factory=Counter)  # code -> connections ended early
    versions: Counter[str] = field(default_factory=Counter)  # version -> replies
    series: Series = field(default_factory=Series)  # echo round trips over time

    def to_dict(self, clients: int, hold: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"clients": clients, "connects": self.connects,
                             "connect_failures": self.connect_failures}
        if hold:
            d.update(cut=self.cut, moved=self.moved, messages=self.messages)
        else:
            d.update(sent=self.sent, echoed=self.echoed, lost=self.lost,
                     mismatched=self.mismatched)
        d["closes"] = {str(code): n for code, n in sorted(self.closes.items())}
        d["abnormal_closes"] = self.closes[ABNORMAL]
        d["versions"] = dict(sorted(self.versions.items()))
        r = sorted(self.reconnects)
        d["reconnect_ms"] = {"count": len(r), "median": _ms(r, 0.5), "p99": _ms(r, 0.99),
                             "max": _ms(r, 1.0)}
        if not hold:
            d["series"] = self.series.to_dict()
        return d


def _ms(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return round(1000 * sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))], 1)


def close_code(exc: ConnectionClosed) -> int:
    """The code the server closed with; 1006 when no close frame came."""
    return exc.rcvd.code if exc.rcvd is not None else ABNORMAL


async def open_ws(url: str, stats: Stats, deadline: float, n: int = -1
                  ) -> ClientConnection | None:
    loop = asyncio.get_running_loop()
    try:
        ws = await connect(url, open_timeout=max(0.1, min(TIMEOUT, deadline - loop.time())),
                           close_timeout=TIMEOUT, ping_interval=None)
    except (OSError, TimeoutError, WebSocketException):
        stats.connect_failures += 1
        return None
    stats.connects += 1
    closed = stats.closed_at.pop(n, None)
    if closed is not None:
        stats.reconnects.append(loop.time() - closed)
    return ws


def closed(stats: Stats, n: int, code: int) -> None:
    """Client n's connection ended with `code`: count it, start its reconnect clock."""
    stats.closes[code] += 1
    stats.closed_at[n] = asyncio.get_running_loop().time()


_stop: list[float] = []  # set to [now] by SIGINT/SIGTERM: an earlier deadline


def _deadline(deadline: float) -> float:
    return min([deadline, *_stop])


async def echo_client(url: str, n: int, stats: Stats, deadline: float,
                      pause: float = PAUSE, delay: float = 0.0) -> None:
    """Echo in a loop until the deadline, reconnecting after any close."""
    loop = asyncio.get_running_loop()
    seq = 0
    await asyncio.sleep(delay)
    while loop.time() < _deadline(deadline):
        ws = await open_ws(url, stats, deadline, n)
        if ws is None:
            await asyncio.sleep(RETRY)
            continue
        try:
            while loop.time() < _deadline(deadline):
                text = f"{n}-{seq}"
                seq += 1
                await ws.send(text)
                stats.sent += 1
                start = loop.time()
                try:
                    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
                except BaseException:
                    stats.lost += 1
                    stats.series.record(False, loop.time() - start)
                    raise
                stats.echoed += 1
                stats.series.record(True, loop.time() - start)
                try:
                    reply = json.loads(raw)
                except ValueError:
                    reply = {"echo": raw}  # a plain echo service
                if not isinstance(reply, dict):
                    reply = {"echo": raw}
                stats.versions[str(reply.get("version", "?"))] += 1
                if reply.get("echo") != text:
                    stats.mismatched += 1
                await asyncio.sleep(pause)
        except ConnectionClosed as exc:
            closed(stats, n, close_code(exc))
        except TimeoutError:
            pass  # counted as lost; try a new connection
        finally:
            await ws.close()


async def hold_client(url: str, n: int, stats: Stats, deadline: float,
                      delay: float = 0.0) -> None:
    """Read the stream until the deadline; reconnect only when the server
    said to go (1001, 1012), end at any other close."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    first = True
    while (first or n in stats.closed_at) and _deadline(deadline) > loop.time():
        ws = await open_ws(url, stats, deadline, n)
        if ws is None:
            if first:
                return
            await asyncio.sleep(RETRY)
            continue
        first = False
        try:
            while (left := _deadline(deadline) - loop.time()) > 0:
                try:
                    reply = json.loads(await asyncio.wait_for(ws.recv(), min(left, 0.5)))
                except TimeoutError:
                    continue  # quiet for a while, or the deadline passed: it lasted
                stats.messages += 1
                stats.versions[str(reply.get("version"))] += 1
        except ConnectionClosed as exc:
            code = close_code(exc)
            closed(stats, n, code)
            if code in GO_AWAY:
                stats.moved += 1
            else:
                stats.cut += 1
                stats.closed_at.pop(n, None)
        finally:
            await ws.close()


async def run_async(url: str, clients: int, hold: int, seconds: float,
                    path: str = "/ws", pause: float = PAUSE, ramp: float = 0.0
                    ) -> dict[str, Any]:
    base = url.rstrip("/")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop early, still report
        loop.add_signal_handler(sig, lambda: _stop.append(loop.time()))
    echo, held = Stats(), Stats()
    total = max(1, clients + hold)
    await asyncio.gather(
        *[echo_client(base + path, n, echo, deadline, pause, ramp * n / total)
          for n in range(clients)],
        *[hold_client(base + "/ws/hold", n, held, deadline, ramp * (clients + n) / total)
          for n in range(hold)])
    return {"url": base, "seconds": seconds, "echo": echo.to_dict(clients, hold=False),
            "hold": held.to_dict(hold, hold=True)}


def run(url: str, clients: int, hold: int, seconds: float, path: str = "/ws",
        pause: float = PAUSE, ramp: float = 0.0) -> dict[str, Any]:
    """Run the load for `seconds` (plus at most a few TIMEOUTs) and return its counts."""
    return asyncio.run(run_async(url, clients, hold, seconds, path, pause, ramp))


def main() -> int:
    ap = argparse.ArgumentParser(description="WebSocket load against an echo endpoint")
    ap.add_argument("--url", required=True, help="ws://host:port of the service")
    ap.add_argument("--clients", type=int, default=16, help="echo clients on /ws")
    ap.add_argument("--hold", type=int, default=0, help="long-lived clients on /ws/hold")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--path", default="/ws", help="the echo endpoint (default /ws)")
    ap.add_argument("--pause", type=float, default=PAUSE,
                    help=f"seconds between an echo and the next message (default {PAUSE})")
    ap.add_argument("--ramp", type=float, default=0.0,
                    help="seconds over which the clients make their first connects")
    args = ap.parse_args()
    print(json.dumps(run(args.url, args.clients, args.hold, args.seconds, args.path,
                         args.pause, args.ramp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
