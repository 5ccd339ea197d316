"""`python -m bench.faults`: the fault suite from the command line; exit 1 on a violation.

python -m bench.faults --duration-s 600 --clients 64 --accounts 8
python -m bench.faults --duration-s 600 --clients 64 --accounts 1000 --seed 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from bench.faults.nemesis import FAULT_KINDS, NemesisConfig
from bench.faults.run import RunConfig, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument(
        "--merchants", type=int, default=2, help="sellers of escrow trades (at least 1)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="gateway processes (at least 2)")
    parser.add_argument("--funding-minor", type=int, default=100, help="per account")
    parser.add_argument(
        "--fault-interval-s",
        type=float,
        nargs=2,
        default=(5.0, 30.0),
        metavar=("MIN", "MAX"),
        help="quiet time before each fault, drawn between MIN and MAX",
    )
    parser.add_argument(
        "--faults", default=",".join(FAULT_KINDS), help=f"comma-separated, of {FAULT_KINDS}"
    )
    parser.add_argument("--workdir", type=Path, help="keep PostgreSQL and the server log here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 2:
        _parser().error("--workers must be at least 2: a worker is killed while others serve")
    config = RunConfig(
        duration_s=args.duration_s,
        clients=args.clients,
        accounts=args.accounts,
        merchants=args.merchants,
        seed=args.seed,
        workers=args.workers,
        funding_minor=args.funding_minor,
        nemesis=NemesisConfig(
            interval_s=tuple(args.fault_interval_s), kinds=tuple(args.faults.split(","))
        ),
        workdir=args.workdir,
    )
    report = uvloop.run(run(config, log=lambda line: print(line, flush=True)))
    print(report.render(), flush=True)
    return 0 if report.violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
