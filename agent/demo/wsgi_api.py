"""The demo API as a plain WSGI app (stdlib only), for the benchmark that
replaces it with gunicorn's USR2 re-exec (bench/gunicorn_usr2.py), and as a
release (`main`) served by gunicorn with the drain kit's hooks
(zdd_drain.gunicorn, in agent/demo/gunicorn_conf.py): gthread workers,
READY=1 once every worker accepts, graceful_timeout from the grace period.
`--plain` leaves the kit out (gunicorn's own READY=1 at boot, its defaults).

`GET /` answers JSON {"version": V, "pid": P}: V is ZDD_VERSION as the
serving process sees it (default "v1"; gunicorn's `raw_env` sets it in the
master, the workers inherit it), P the worker's PID. Anything else is a 404.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIEnvironment


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO", "/") != "/":
        body = b'{"error": "not found"}'
        status = "404 Not Found"
    else:
        body = json.dumps({"version": os.environ.get("ZDD_VERSION", "v1"),
                           "pid": os.getpid()}).encode()
        status = "200 OK"
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def main() -> int:
    ap = argparse.ArgumentParser(description="zdd-agent's demo WSGI API under gunicorn")
    ap.add_argument("--version", required=True)
    ap.add_argument("--listen", help="host:port to bind when not socket-activated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="gunicorn without the drain kit")
    args = ap.parse_args()
    from gunicorn.app.wsgiapp import run

    os.environ["ZDD_VERSION"] = args.version
    conf = "agent.demo.gunicorn_plain" if args.plain else "agent.demo.gunicorn_conf"
    sys.argv = ["gunicorn", "-c", f"python:{conf}", "--workers", str(args.workers),
                *(["--bind", args.listen] if args.listen else []), "agent.demo.wsgi_api:app"]
    run()
    return 0
