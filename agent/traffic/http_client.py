"""HTTP load with clients people use: Node's http (HTTP/1.1, keep-alive or
`Connection: close`) and http2 (h2c with prior knowledge, several concurrent
streams per connection) modules, in http_client.js.

Why Node for HTTP/2: h2load never reconnects once a server ends its
connection with GOAWAY (across a swap it goes quiet, or hangs with requests
left); Python's h2 library, under httpx, moves the whole connection to
CLOSED on RECV_GOAWAY and refuses the responses to the streams the GOAWAY
says the server still answers ("Invalid input ConnectionInputs.RECV_HEADERS
in state ConnectionState.CLOSED"), against RFC 9113 6.8; curl 7.88 fails
every transfer after the first on a reused h2c connection ("Error in the
HTTP2 framing layer"). Node's client finishes the streams a GOAWAY covers
and opens a new session for the next requests; a stream refused with
REFUSED_STREAM (not processed: RFC 9113 8.7) is retried once and counted as
refused_retried. The service must survive a
client's own GOAWAY too (Node sends one when it closes a session): see
agent.demo.asgi_api.answer_after_client_goaway.

    python -m agent.traffic.http_client --url http://127.0.0.1:8080/ --protocol h2 \
        --connections 8 --streams 4 --seconds 20

prints one JSON object: sent, ok, failed (no response, or a 5xx), errors by
kind, versions that answered, p50/p99 in ms, and the series (series.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .series import Series

SCRIPT = Path(__file__).with_name("http_client.js")
PROTOCOLS = ("http1", "h2")


def argv(url: str, protocol: str, connections: int, streams: int, seconds: float,
         keepalive: bool = True) -> list[str]:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise RuntimeError("node is not installed (apt-get install nodejs)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    opts = {"url": url, "protocol": protocol, "connections": connections, "streams": streams,
            "seconds": seconds, "keepalive": keepalive}
    return [node, str(SCRIPT), json.dumps(opts)]


def summary(out: str) -> dict[str, Any]:
    """The client's JSON, with p50/p99 over the whole run."""
    d = dict(json.loads(out.strip().splitlines()[-1]))
    s = Series.from_dict(d["series"])
    d["p50_ms"], d["p99_ms"] = round(s.percentile(50), 2), round(s.percentile(99), 2)
    return d


def run(url: str, protocol: str, connections: int, streams: int, seconds: float,
        keepalive: bool = True) -> dict[str, Any]:
    """Run the client for `seconds`; SIGINT or SIGTERM to this process ends
    it early (passed on to node, which finishes its requests and reports)."""
    proc = subprocess.Popen(argv(url, protocol, connections, streams, seconds, keepalive),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    forward = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s))
               for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    finally:
        for sig, old in forward.items():
            signal.signal(sig, old)
    if proc.returncode != 0:
        raise RuntimeError(f"the HTTP client exited {proc.returncode}: {err[-2000:]}")
    return summary(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="HTTP/1.1 or h2c load with Node's clients; "
                                             "counts failures")
    ap.add_argument("--url", required=True)
    ap.add_argument("--protocol", choices=PROTOCOLS, default="http1")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--streams", type=int, default=4,
                    help="h2: concurrent streams per connection; http1: sockets per connection")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--close", action="store_true", help="http1: Connection: close")
    args = ap.parse_args()
    if not (1 <= args.connections <= 1000 and 1 <= args.streams <= 100
            and 0 < args.seconds <= 3600):
        ap.error("connections 1..1000, streams 1..100, seconds 0..3600")
    print(json.dumps(run(args.url, args.protocol, args.connections, args.streams,
                         args.seconds, not args.close)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
