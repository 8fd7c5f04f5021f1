"""End-to-end tests: the real gateway process, real upstreams, real clients.

Each test module starts ``twistd -n txgateway`` as a subprocess on a generated
configuration (see :mod:`tests.integration.harness`), puts small Twisted
upstream servers behind it on loopback ports and drives it with curl and raw
sockets.  Only 127.0.0.1 is ever contacted.
"""
