"""gunicorn settings of the demo WSGI release without the drain kit: the
same workers, gunicorn's own behaviour (READY=1 when its arbiter boots,
graceful_timeout 30 s), to compare against (bench/drainkit.py)."""

worker_class = "gthread"
threads = 4
keepalive = 5
loglevel = "warning"
