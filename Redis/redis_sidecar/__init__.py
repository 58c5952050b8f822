"""Redis module helpers: the redis-server launcher, queue-depth exporter, backups and checks.

Console script ``redis-sidecar`` (see ``Redis/README.md``).  The import name is not ``redis``:
that is redis-py.
"""
