# gunicorn -c gunicorn.conf.py app:app
# The drain kit's hooks and settings: READY=1 once every worker accepts,
# graceful_timeout from ZDD_GRACE_PERIOD, gthread workers, /ready -> 503
# from SIGTERM on. gunicorn adopts systemd's listeners (LISTEN_FDS) itself.
from zdd_drain.gunicorn import *  # noqa: F403

workers = 2
threads = 4
keepalive = 5
