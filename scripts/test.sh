#!/usr/bin/env bash
# Installs what the tests need (Mosquitto, a virtualenv with the project and its test extras)
# and runs every check: ruff (lint + format), mypy, import-linter and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (apt)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients
fi
for tool in openssl tmux; do
  command -v "$tool" >/dev/null 2>&1 || echo "note: $tool not found; tests that need it will say so"
done

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
