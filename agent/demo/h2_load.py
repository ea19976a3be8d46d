"""HTTP/2 load across swaps with a client people use: Node's http2 module
(nghttp2) over h2c with prior knowledge, each connection multiplexing
several concurrent streams (h2_load.js).

Why not the usual tools: h2load never reconnects once a server ends its
connection with GOAWAY (across a swap it goes quiet, or hangs with requests
left); Python's h2 library, under httpx, moves the whole connection to
CLOSED on RECV_GOAWAY and refuses the responses to the streams the GOAWAY
says the server still answers ("Invalid input ConnectionInputs.RECV_HEADERS
in state ConnectionState.CLOSED"), against RFC 9113 6.8; curl 7.88 fails
every transfer after the first on a reused h2c connection ("Error in the
HTTP2 framing layer"). Node's client finishes the streams a GOAWAY covers
and opens a new session for the next requests.

    python -m agent.demo.h2_load --url http://127.0.0.1:8080/ --connections 8 \
        --streams 4 --seconds 20

prints one JSON object: sent, ok, failed, errors by kind, versions that
answered, sessions opened, GOAWAYs received, p50/p99 latency in ms.
The service must survive a client's own GOAWAY (Node sends one when it
closes a session): see agent.demo.asgi_api.answer_after_client_goaway.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("h2_load.js")


def argv(url: str, connections: int, streams: int, seconds: float) -> list[str]:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise RuntimeError("node is not installed (apt-get install nodejs)")
    return [node, str(SCRIPT), url, str(connections), str(streams), f"{seconds:g}"]


def run(url: str, connections: int, streams: int, seconds: float) -> dict[str, Any]:
    r = subprocess.run(argv(url, connections, streams, seconds), capture_output=True,
                       text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"the HTTP/2 client exited {r.returncode}: {r.stderr[-2000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description="HTTP/2 (h2c) load with Node's http2 client; "
                                             "counts failures")
    ap.add_argument("--url", required=True)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--streams", type=int, default=4, help="concurrent streams per connection")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if not (1 <= args.connections <= 1000 and 1 <= args.streams <= 100
            and 0 < args.seconds <= 3600):
        ap.error("connections 1..1000, streams 1..100, seconds 0..3600")
    print(json.dumps(run(args.url, args.connections, args.streams, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
