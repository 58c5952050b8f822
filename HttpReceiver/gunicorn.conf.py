"""gunicorn settings of HttpReceiver, versioned with the app.

Loaded by the ``httpreceiver`` console script (httpreceiver.server), which then sets ``bind``
from ``httpreceiver.bind`` and ``workers`` from ``httpreceiver.workers`` (0 = one per core).

Shutdown: SIGTERM closes the API socket, every worker finishes its current request, and
workers still busy after ``graceful_timeout`` seconds are killed.  A request takes at most a
few seconds (Redis socket timeout 10 s), so set the pod's terminationGracePeriodSeconds above
``graceful_timeout`` (30 s, the Kubernetes default, leaves 10 s of margin).
"""

# Threaded workers (one process per core, from httpreceiver.workers): a request spends most of
# its time waiting for Redis' fsync, when the GIL is free for the other threads; keep-alive
# spares the reverse proxy a TCP connection per message.  Measured on 2 cores: about 20 % less
# CPU per request than 4 sync workers (bench/httpreceiver).
worker_class = "gthread"
threads = 4
# Longer than the reverse proxy's idle timeout (nginx upstream keepalive_timeout: 60 s), so the
# proxy, not gunicorn, closes idle connections (no request races a closing connection).
keepalive = 75
graceful_timeout = 20
timeout = 30
backlog = 2048
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# Several instances may run on one machine (tests): no shared control socket in $HOME.
control_socket_disable = True
# The reverse proxy sets X-Forwarded-*; trust it only from loopback by default.
forwarded_allow_ips = "127.0.0.1,::1"


def when_ready(server):
    """API socket bound; the app object (httpreceiver.server) records the arbiter."""
    server.app.when_ready(server)


def post_fork(server, worker):
    """In the new worker: drop the master's metrics socket."""
    server.app.post_fork(worker)


def child_exit(server, worker):
    """A worker exited: its live gauges no longer count (prometheus multiprocess mode)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
