#!/usr/bin/env bash
# Set up (first run only) and start txengine on its embedded PostgreSQL.
# Extra arguments go to `txengine serve` (for example --port 8080 --workers 2).
EXTRAS=""
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/txengine serve "$@"
