"""The bank simulator on its own: run as a process, it refuses unsigned orders, and it
remembers orders so a repeat is acknowledged without a second callback."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import aiohttp

from banksim import BankSimulator, SimConfig
from banksim.simulator import sign


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_python_m_banksim_serves_until_terminated() -> None:
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "banksim", "--port", str(port), "--latency-ms", "5",
        "--failure-rate", "0.5", "--silence-rate", "0.1", "--seed", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert f"127.0.0.1:{port}" in line.decode()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            assert response.status == 200
            assert (await response.json())["orders"] == 0
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=20) == 0


async def test_orders_must_be_signed_and_are_remembered() -> None:
    bank = BankSimulator(SimConfig(silence_rate=1.0))
    url = await bank.start()
    order = {
        "request_id": "42", "amount_minor": 5, "currency": "CNY",
        "callback_url": "http://127.0.0.1:9/cb",
    }  # fmt: skip
    body = json.dumps(order).encode()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/cash/collect", data=body) as unsigned:
                assert unsigned.status == 401
            headers = {"Bank-Signature": sign("txengine-dev-secret-cash", int(time.time()), body)}
            for _ in range(2):
                async with session.post(
                    f"{url}/v1/cash/collect", data=body, headers=headers
                ) as response:
                    assert response.status == 202
                    assert (await response.json())["bank_reference"] == "CASH-00000001"
            async with session.get(f"{url}/v1/orders/cash/42") as shown:
                assert (await shown.json())["fate"] == "silence"
        assert bank.stats["orders"] == 1 and bank.stats["repeats"] == 1
        assert bank.stats["refused"] == 1
    finally:
        await bank.stop()
