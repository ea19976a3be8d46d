#!/usr/bin/env python3
"""Serve app.py with hypercorn (HTTP/1.1, h2c, WebSocket) through the drain
kit: `python serve.py` (by hand: ZDD_LISTEN=127.0.0.1:8080 python serve.py)."""

import asyncio
import sys

from hypercorn.config import Config

from app import app
from zdd_drain.hypercorn import serve

config = Config()  # your settings; bind comes from systemd (or ZDD_LISTEN)
config.accesslog = None
sys.exit(asyncio.run(serve(app, config)))
