"""Development tools: real servers for tests, benchmarks and the local stack.

Nothing here is shipped in a service image.  ``servers`` starts redis-server processes on free
loopback ports, ``sink`` is the SMTP server that plays "the internet" (scripted replies per
recipient), ``webhook`` is a customer webhook endpoint, ``stack`` runs the whole platform on
one machine.
"""
