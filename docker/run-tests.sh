#!/usr/bin/env bash
# Waits until the containerd at $PYCTRD_TEST_ADDRESS answers, then runs the integration
# tests against it. Compose's health checks do not run under podman without systemd, so
# `depends_on: condition: service_healthy` alone does not guarantee the daemon is up.
#
#   PYCTRD_TEST_ADDRESS  socket of the running containerd (default /run/containerd/containerd.sock)
#   PYCTRD_WAIT_SECONDS  how long to wait for it (default 60)
#   PYTHON               interpreter with the project installed (default /opt/venv/bin/python)
#   PYCTRD_TESTS         the tests to run (default tests/integration)
#
# Extra arguments are passed on to pytest.
set -euo pipefail

export PYCTRD_TEST_ADDRESS="${PYCTRD_TEST_ADDRESS:-/run/containerd/containerd.sock}"
PYTHON="${PYTHON:-/opt/venv/bin/python}"
WAIT_SECONDS="${PYCTRD_WAIT_SECONDS:-60}"

"$PYTHON" -c '
import sys
import time

from pyctrd_cache.client import Client
from pyctrd_cache.errors import CacheError

address, wait = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + wait
last = "no attempt"
with Client(address, timeout=2.0, retry_budget=0.0) as client:
    while True:
        try:
            info = client.version.get()
        except CacheError as err:
            last = str(err)
        else:
            print(f"containerd {info.version} answers at {address}", flush=True)
            break
        if time.monotonic() >= deadline:
            sys.exit(f"containerd at {address} did not answer within {wait:g}s: {last}")
        time.sleep(0.5)
' "$PYCTRD_TEST_ADDRESS" "$WAIT_SECONDS"

# PYCTRD_TESTS: which tests (paths or node ids, separated by spaces); default all of them.
# shellcheck disable=SC2086
exec "$PYTHON" -m pytest ${PYCTRD_TESTS:-tests/integration} -x -q "$@"
