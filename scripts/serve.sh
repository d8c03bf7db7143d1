#!/usr/bin/env bash
# Set up the node in ./.venv and run it on its embedded default: SQLite and a local
# spool under ./dicom-router-data (or $DICOM_ROUTER_DATA_DIR), port 11112, AE title ROUTER.
#   scripts/serve.sh [serve options, e.g. --port 11113 --aet ROUTER]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DICOM_ROUTER_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q .
export DICOM_ROUTER_DATA_DIR=${DICOM_ROUTER_DATA_DIR:-./dicom-router-data}
"$venv/bin/dicom-router" init
exec "$venv/bin/dicom-router" -v serve "$@"
