"""The README's example client and its `scurl` helper work, as printed, against a real
server: a partner copying them gets signed requests that are accepted."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from typing import Any

from tests.system.support import (
    REPO_ROOT,
    SYSTEM_PARTNER,
    SYSTEM_SECRET,
    StartServer,
)


def _block(language: str, after: str) -> str:
    """The first ```language block after the heading `after` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match is not None, (language, after)
    return match.group(1)


async def test_the_readme_python_client(start_server: StartServer) -> None:
    server = await start_server()
    namespace: dict[str, Any] = {}
    exec(_block("python", "### How a partner signs a request"), namespace)
    client = namespace["Client"](server.url, SYSTEM_PARTNER, SYSTEM_SECRET)
    await asyncio.to_thread(namespace["demo"], client)
    status, problem = await asyncio.to_thread(client.call, "GET", "/v1/accounts/12345")
    assert (status, problem["code"]) == (404, "account_not_found")


async def test_the_readme_scurl_helper(start_server: StartServer) -> None:
    server = await start_server()
    walk_through = _block("sh", "### A walk-through with curl")
    helper = walk_through[walk_through.index("scurl() {") : walk_through.index("\n}\n") + 3]
    script = (
        helper
        + """scurl POST /v1/accounts '{"currency": "CNY", "kind": "user"}' """
        + """-H 'Idempotency-Key: readme-1' -o /dev/null -w '%{http_code} '\n"""
        + "scurl GET /v1/accounts/12345 '' -o /dev/null -w '%{http_code}'\n"
    )
    env = {
        **os.environ,
        "TXENGINE_URL": server.url,
        "PARTNER_ID": SYSTEM_PARTNER,
        "PARTNER_SECRET": SYSTEM_SECRET,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout == "201 404", (done.stdout, done.stderr)
