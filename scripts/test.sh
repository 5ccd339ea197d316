#!/usr/bin/env bash
# Set up (first run only) and run the test suite; the tests start their own embedded
# PostgreSQL. Extra arguments go to pytest (for example -x -k idempotency).
EXTRAS="[dev]"
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest "$@"
