# syntax=docker/dockerfile:1
#
# txgateway container image.
#
#   docker build -t txgateway .
#   docker run --rm -e ADMIN_TOKEN="$(openssl rand -hex 32)" -p 8080:8080 -p 9090:9090 txgateway
#   docker run --rm -e ADMIN_TOKEN=... -p 8080:8080 -v "$PWD/mine:/etc/txgateway:ro" txgateway
#       (your own mine/config.yaml; or pass `-c /path/to/file.yaml` after the image name)
#
# The default config (deploy/config/gateway.yaml) binds the admin listener to
# 0.0.0.0, which needs a token: without ADMIN_TOKEN the gateway refuses to
# start and says so.
#
# The build context is cut down by .dockerignore to what the wheel needs
# (pyproject.toml, setup.cfg, README.md, txgateway/, twisted/) plus
# deploy/config/, so `COPY . .` below copies only those.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
# builder: build the project's wheel and install it, with its dependencies,
# into a self-contained venv at /opt/venv.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# A C toolchain only for dependencies without a wheel for this platform
# (httptools, cffi, ... on less common architectures); it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv

WORKDIR /src
COPY . .

# Build the wheel (not an editable/source install) so the image holds exactly
# what `pip install txgateway[tracing]` would: that includes the twistd plugin
# twisted/plugins/txgateway_plugin.py, which lands in the venv's
# site-packages/twisted/plugins/, and the OpenTelemetry SDK + OTLP/HTTP
# exporter for observability.tracing.  The wheel is named by its path (not
# `--find-links`), so pip can never pick a package of the same name from an
# index instead.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && set -- /wheels/txgateway-*.whl \
 && /opt/venv/bin/pip install "$1[tracing]"

# Fail the build if twistd cannot see the plugin, and write Twisted's plugin
# cache (dropin.cache) now: at run time site-packages is read-only and owned
# by root, so Twisted could not write it there.  Run from / so the source
# tree's own twisted/plugins/ is not on sys.path.
RUN cd / && /opt/venv/bin/python -c "\
from twisted.application.service import IServiceMaker; \
from twisted.plugin import getPlugins; \
names = [p.tapname for p in getPlugins(IServiceMaker)]; \
assert 'txgateway' in names, names; \
print('twistd plugins:', ', '.join(sorted(names)))"

# ---------------------------------------------------------------------------
# runtime: the venv, the default config and an unprivileged user; no
# compiler, no pip cache, no source tree.
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="txgateway" \
      org.opencontainers.image.description="An API gateway on Twisted: HTTP/1.1, HTTP/2 + gRPC and WebSocket in front of your services" \
      org.opencontainers.image.licenses="MIT"

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    TXGATEWAY_HEALTH_URL=http://127.0.0.1:9090/health

# Fixed numeric ids so Kubernetes' runAsNonRoot/runAsUser can check them.
RUN groupadd --system --gid 10001 txgateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin txgateway \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/txgateway

# Same path as in the builder, so the venv's interpreter symlinks and script
# shebangs (#!/opt/venv/bin/python) stay valid.  Owned by root: the gateway
# user can read but not modify its own code.
COPY --from=builder /opt/venv /opt/venv

# The container's default config: no routes yet, the admin listener on
# 0.0.0.0:9090 (so probes and Prometheus reach it) guarded by ADMIN_TOKEN.
COPY deploy/config/gateway.yaml /etc/txgateway/config.yaml
# Refuse to build an image whose own default config does not validate (with
# a stand-in for the token it takes from the environment at run time).
RUN ADMIN_TOKEN=build-time-check txgateway check -c /etc/txgateway/config.yaml

# twistd's --rundir (default "."): relative paths in a config resolve here.
WORKDIR /var/lib/txgateway
USER 10001:10001

# 8080 HTTP/1.1 + h2c + WebSocket, 8443 TLS (when server.tls is configured),
# 9090 admin: /health /ready /metrics /admin/* (deploy/kubernetes/ uses the
# same numbers; tests/test_deploy.py checks that they agree).
EXPOSE 8080 8443 9090

# twistd handles SIGTERM itself: /ready 503, keep accepting for
# server.shutdown_delay, then drain up to server.shutdown_grace and exit.
# The exec form keeps it PID 1 so it receives the signal directly; give
# `docker stop -t` more than delay + grace (the default 10 s is less).
STOPSIGNAL SIGTERM

# For plain `docker run`; Kubernetes ignores it and uses the probes in
# deploy/kubernetes/deployment.yaml.  Set TXGATEWAY_HEALTH_URL if your config
# moves the admin listener.  Proxies from the environment are bypassed.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ['TXGATEWAY_HEALTH_URL'], timeout=2)"]

# -n        : stay in the foreground, log to stdout;
# --pidfile= : no pid file (the root filesystem may be read-only).
# Arguments after the image name replace CMD, e.g. `-c /path/other.yaml`.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "txgateway"]
CMD ["-c", "/etc/txgateway/config.yaml"]
