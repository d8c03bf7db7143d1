#!/usr/bin/env bash
# Set up the node in ./.venv and run it on its embedded default.
#   scripts/serve.sh [extra options]
# For now the node is the protocol library's storage SCP: it listens on port 11112 as
# AE title ROUTER and writes what it receives under ./dicom-router-data/received.
# (The router's ingest, issue "router ingest", replaces this with `dicom-router serve`.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DICOM_ROUTER_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q .
data=${DICOM_ROUTER_DATA_DIR:-./dicom-router-data}
mkdir -p "$data/received"
exec "$venv/bin/python" -m protocol storescp "${DICOM_ROUTER_LISTENER_PORT:-11112}" \
    -aet ROUTER -od "$data/received" -v "$@"
