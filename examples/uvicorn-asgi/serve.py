#!/usr/bin/env python3
"""Serve app.py with uvicorn through the drain kit: `python serve.py`
(by hand: ZDD_LISTEN=127.0.0.1:8080 python serve.py)."""

import sys

from app import app
from zdd_drain.uvicorn import run

sys.exit(run(app, log_level="info"))  # any uvicorn.Config keyword
