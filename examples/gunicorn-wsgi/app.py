"""A small WSGI app: GET / answers JSON. Nothing in it knows about
draining: the drain kit's gunicorn hooks (gunicorn.conf.py) do it."""

import json
import os


def app(environ, start_response):
    body = json.dumps({"version": os.environ.get("ZDD_VERSION", "dev"),
                       "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
