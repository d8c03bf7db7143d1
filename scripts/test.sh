#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine and run them.
#   scripts/test.sh [pytest args...]
# Installs the system peers the tests use (DCMTK, openssl, strace, PostgreSQL),
# builds a fresh virtual environment with the package installed non-editable (so a file
# missing from the wheel fails here), then runs pytest (on-demand suites excluded).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${DICOM_ROUTER_TEST_VENV:-.venv-test}
python=${PYTHON:-python3}

missing=()
command -v storescp >/dev/null 2>&1 || missing+=(dcmtk)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v strace >/dev/null 2>&1 || missing+=(strace)  # FI-04: the durable order, traced
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q ".[test,postgres]"

export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# Run from the venv's own pytest (not `python -m pytest`) so the installed wheel, not the
# source tree, is what the tests import.
exec "$venv/bin/pytest" "$@"
