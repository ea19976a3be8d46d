"""The demo API as a plain WSGI app (stdlib only), for the benchmark that
replaces it with gunicorn's USR2 re-exec (bench/gunicorn_usr2.py).

`GET /` answers JSON {"version": V, "pid": P}: V is ZDD_VERSION as the
serving process sees it (default "v1"; gunicorn's `raw_env` sets it in the
master, the workers inherit it), P the worker's PID. Anything else is a 404.
"""

from __future__ import annotations

import json
import os
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
