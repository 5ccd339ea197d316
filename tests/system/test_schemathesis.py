"""schemathesis against the real server, every request signed: for every operation in
/openapi.json, data that fits the schema and data that does not, on a bounded budget.

No answer may be a 5xx; every answer must match the document (status, content type,
headers, body schema); data the schema forbids must be refused with a 4xx. The count of
cases sent is printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openapi import document
from tests.system.support import SIGNER, StartServer, open_ledger

EXAMPLES_PER_OPERATION_MAX: Final = 30  # per generation mode; the whole run stays < 2 min
_CHECKS: Final = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


BANK_CALLBACK = "/v1/channels/{channel}/callbacks"


class _Signed(requests.auth.AuthBase):
    """Signs each request exactly as it goes out (gateway/signing.py)."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        data = body.encode() if isinstance(body, str) else body
        assert isinstance(data, bytes) and request.method is not None
        key = request.headers.get("Idempotency-Key", "")
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        # The server reads header bytes as UTF-8 (surrogates for what is not), without the
        # white space around them: sign that.
        key = key.encode("latin-1", "replace").decode("utf-8", "surrogateescape").strip(" \t")
        signed = SIGNER.headers(request.method, request.path_url, data, idempotency_key=key)
        request.headers.update(signed)
        return request


def _explore(
    strategy: Any,
    *,
    base_url: str,
    session: requests.Session,
    checks: list[Any],
    count: Callable[[int], None],
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION_MAX,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, timeout=15)
        if case.path == BANK_CALLBACK:
            # Banks sign callbacks with the channel's secret, which a partner (and this
            # fuzzer) does not have: every one must be refused, and is counted apart.
            assert response.status_code in (401, 404), response.text
            count(-response.status_code)
        else:
            count(response.status_code)
        case.validate_response(response, checks=checks)

    run()


def _fuzz(base_url: str, known_ids: dict[str, str]) -> Counter[str | int]:
    """Run every operation in both modes; return how many cases each mode sent, and how
    many answers had each status."""
    schema = schemathesis.openapi.from_dict(document())
    session = requests.Session()
    session.auth = _Signed()
    sent: Counter[str | int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            negative = mode is GenerationMode.NEGATIVE
            try:
                _explore(
                    operation.as_strategy(generation_mode=mode),
                    base_url=base_url,
                    session=session,
                    checks=_CHECKS + ([negative_data_rejection] if negative else []),
                    count=lambda status, mode=mode: sent.update([mode.value, status]),
                )
            except Unsatisfiable:
                # An operation without parameters or body has no invalid input to make.
                assert negative, operation.label
    # Real ids as well: the generated ones almost never exist.
    for path in (f"/v1/accounts/{known_ids['account']}", f"/v1/transfers/{known_ids['transfer']}"):
        response = session.get(base_url + path, timeout=15)
        assert response.status_code == 200, response.text
    return sent


async def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    start_server: StartServer,
) -> None:
    server = await start_server()
    ledger = await open_ledger(server.url, users=2, funding_minor=1_000)
    known = {"account": ledger.users[0], "transfer": ledger.funding_transfer_ids[0]}
    sent = await asyncio.to_thread(_fuzz, server.url, known)
    modes = {k: v for k, v in sent.items() if isinstance(k, str)}
    statuses = {k: v for k, v in sent.items() if isinstance(k, int)}
    print(f"\nschemathesis cases sent: {modes}, total {sum(modes.values())}; {statuses}")
    assert modes["positive"] > 0 and modes["negative"] > 0
    assert 401 not in statuses, "requests must pass authentication to test anything"
    assert any(200 <= status < 300 for status in statuses)
