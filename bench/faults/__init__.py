"""A fault suite in the manner of Jepsen's bank test: many clients move money over HTTP
while a nemesis kills gateway workers, the whole server, PostgreSQL, drops client
connections and slows or cuts the database's connections; a checker then proves that no
acknowledged money was lost, doubled or left stuck.

`python -m bench.faults --help` runs it; `tests/faults/` runs a short, seeded version.

| module | what |
| --- | --- |
| `client.py` | the one HTTP client every request of the suite goes through |
| `proxy.py` | a TCP proxy between the gateway and PostgreSQL that delays, stalls or cuts |
| `cluster.py` | PostgreSQL, the proxy and `txengine serve`, each killable on its own |
| `history.py` | what every client meant to do and what it was told, by idempotency key |
| `workload.py` | the operations clients run (transfers, holds, reads) and their loop |
| `nemesis.py` | the faults, chosen at random from a seed, and their log |
| `checker.py` | the invariants checked after the run, each with its count |
| `run.py` | one run from start to report |
"""
