"""gunicorn settings of HttpReceiver, versioned with the app.

Loaded by the ``httpreceiver`` console script (httpreceiver.server), which then sets ``bind``
from ``httpreceiver.bind`` and ``workers`` from ``httpreceiver.workers`` (0 = one per core).

Shutdown: SIGTERM closes the API socket, every worker finishes its current request, and
workers still busy after ``graceful_timeout`` seconds are killed.  A request takes at most a
few seconds (Redis socket timeout 10 s), so set the pod's terminationGracePeriodSeconds above
``graceful_timeout`` (30 s, the Kubernetes default, leaves 10 s of margin).
"""

# Worker model: gunicorn's asyncio worker (one process per core, from httpreceiver.workers).
# Its event loop parses every connection and httpreceiver.bridge reads each request body, also
# in the loop, before handing the complete request to one of httpreceiver.threads threads that
# run the Flask app.  A client trickling its headers or body therefore holds a socket, never a
# thread: 16 such clients used to take every thread of gthread workers (issue 16, probe 2).
# The body must arrive within httpreceiver.request-timeout-seconds (408 after that); headers
# are bounded in size by the limit_request_* settings below.
worker_class = "asgi"
# Open connections per worker (idle keep-alive and slow ones included); beyond this the
# kernel's backlog holds new ones.  Put a reverse proxy with header timeouts in front for the
# internet at large (the README's Kubernetes section).
worker_connections = 1000
# Our app handles the lifespan protocol (it shuts its thread pool down, closes its Redis connections).
asgi_lifespan = "on"
# Longer than the reverse proxy's idle timeout (nginx upstream keepalive_timeout: 60 s), so the
# proxy, not gunicorn, closes idle connections (no request races a closing connection).
keepalive = 75
graceful_timeout = 20
# Worker heartbeat (the event loop notifies the master every second, however slow the clients).
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
