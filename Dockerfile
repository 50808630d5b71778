# vobiz-agent container image.
#
#   docker build -t vobiz-agent .
#   docker run --rm --ulimit nofile=4096:4096 -p 5000:5000 -e PUBLIC_URL=https://<your-tunnel-host> vobiz-agent
#
# File descriptors: each call is one (two or three with the AI agent), so give the
# container at least 4 × MAX_CALLS + 100 (`--ulimit nofile=4096:4096` covers the
# default MAX_CALLS=50 many times over); short of them, the server logs one line
# per minute and new connections wait.
#
# Two stages: the first installs the app into a virtualenv, the second copies
# only that virtualenv onto a clean base, so pip, the build backend and the
# source tree stay behind in the first stage.

# ── Stage 1: build the virtualenv ────────────────────────────────────────────
FROM python:3.13-slim AS build

# No pip self-update check during the build (needs the network, changes nothing).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Only what `pip install .` reads: the tests, CI scripts and .git never enter
# the image (see also .dockerignore). README.md is the package's long
# description and LICENSE goes into its metadata, so both are needed; phone.html is
# the browser softphone's page, installed with the package.
COPY pyproject.toml README.md LICENSE vobiz_agent.py phone.html ./

# --without-pip: the final venv holds the app and its dependencies only; the
# base image's pip installs into it from outside with --python. setuptools is
# fetched into a throwaway build environment and is not installed either.
# Every dependency ships a wheel for CPython 3.13 on Linux, so no compiler is needed.
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir .

# ── Stage 2: the runtime image ───────────────────────────────────────────────
FROM python:3.13-slim

# A fixed numeric UID/GID, so that `USER` below is numeric and Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd. No home, no shell:
# the app writes nothing to disk. --no-log-init: with a high UID, useradd would
# otherwise write a large sparse /var/log/lastlog into the layer.
RUN groupadd --gid 10001 vobiz \
 && useradd --uid 10001 --gid vobiz --no-log-init --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin vobiz

# Owned by root and read-only for the app user: the running app cannot modify its own code.
COPY --from=build /opt/venv /opt/venv

# The venv first on PATH makes `vobiz-agent` and `python` (healthcheck) its own.
# Unbuffered output: log lines reach `docker logs` as they happen, not in 4 KiB blocks.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

USER 10001:10001

# The app listens on $HOST:$PORT, 0.0.0.0:5000 by default.
EXPOSE 5000

# No curl in slim images; the venv's Python asks /health instead. urlopen raises
# (exit 1) on a refused connection, a timeout or a non-2xx status. Follows $PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '5000') + '/health', timeout=4)"]

# Exec form: vobiz-agent is PID 1 and receives `docker stop`'s SIGTERM itself
# (a shell in between would not forward it). The app handles SIGTERM and exits 0.
CMD ["vobiz-agent"]
