#!/usr/bin/env bash
# Installs what the tests need (Mosquitto, a virtualenv with the project and its test extras)
# and runs every check: ruff (lint + format), mypy, import-linter and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need: the broker, its clients and password tool, and openssl (TLS tests).
need=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto"
command -v mosquitto_sub >/dev/null 2>&1 || need="$need mosquitto-clients"
command -v mosquitto_passwd >/dev/null 2>&1 || [ -x /usr/bin/mosquitto_passwd ] || need="$need mosquitto"
command -v openssl >/dev/null 2>&1 || need="$need openssl"
if [ -n "$need" ]; then
  echo "== installing$need (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== installing fleet-twin[test] into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"

export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff check";   ruff check twin tui tests
echo "== ruff format";  ruff format --check twin tui tests
echo "== mypy";         mypy
echo "== import-linter"; lint-imports
echo "== pytest";       pytest -q "$@"
