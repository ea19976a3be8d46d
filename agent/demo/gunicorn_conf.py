"""gunicorn settings of the demo WSGI release: the drain kit's hooks and
settings (zdd_drain.gunicorn), as a user's gunicorn.conf.py would have them."""

from zdd_drain.gunicorn import *  # noqa: F403 - on_starting, when_ready, post_worker_init, ...

threads = 4
keepalive = 5
loglevel = "warning"
