"""`python -m banksim --port 8091 --latency-ms 50 --failure-rate 0.1 --silence-rate 0.01`

Channel secrets come from TXENGINE_CHANNEL_<NAME>_SECRET, as for txengine itself, with
the same development defaults; they are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

from banksim.simulator import CHANNELS, BankSimulator, SimConfig, dev_secrets


def _secrets() -> dict[str, str]:
    defaults = dev_secrets()
    return {
        name: os.environ.get(f"TXENGINE_CHANNEL_{name.upper()}_SECRET", defaults[name])
        for name in CHANNELS
    }


def _config(argv: list[str] | None) -> tuple[str, int, SimConfig]:
    parser = argparse.ArgumentParser(prog="banksim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--silence-rate", type=float, default=0.0)
    parser.add_argument("--duplicate-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    config = SimConfig(
        secrets=_secrets(),
        latency_ms=args.latency_ms,
        failure_rate=args.failure_rate,
        silence_rate=args.silence_rate,
        duplicate_rate=args.duplicate_rate,
        seed=args.seed,
    )
    return args.host, args.port, config


async def _serve(host: str, port: int, config: SimConfig) -> None:
    simulator = BankSimulator(config)
    url = await simulator.start(host=host, port=port)
    logging.getLogger("banksim").info("bank simulator listening on %s", url)
    print(f"banksim listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await simulator.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    host, port, config = _config(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host, port, config))


if __name__ == "__main__":
    main()
