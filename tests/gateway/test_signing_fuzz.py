"""hypothesis against the parsers a stranger's bytes reach first: the signature headers,
the canonical request, and the Idempotency-Key header.

Each parser must either accept or refuse with its own error (SignatureError,
ProblemError), never anything else; what it accepts must satisfy the documented form;
and a signature must verify for exactly the request it was made for.
`EXAMPLES` counts the cases tried, for the record (`pytest -s` prints them).
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model import IDEMPOTENCY_KEY_LENGTH_MAX
from gateway import signing
from gateway.idempotency import parse_key
from gateway.problems import PROBLEM_TYPES, ProblemError
from gateway.signing import SignatureError, Signer

EXAMPLES: Counter[str] = Counter()
FUZZ = settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like what a header might carry, and much that does not.
_header_text = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.text(alphabet="AZaz09_-+/= \t\x00\u200f\u202e１", max_size=80),
    st.from_regex(r"[A-Za-z0-9_-]{0,70}", fullmatch=True),
    st.integers(min_value=-(10**15), max_value=10**15).map(str),
    st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode()),
)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfuzz cases tried: {dict(EXAMPLES)}, total {sum(EXAMPLES.values())}")


@FUZZ
@given(partner=_header_text, timestamp=_header_text, nonce=_header_text, signature=_header_text)
def test_parse_headers_accepts_or_names_the_check(
    partner: str | None, timestamp: str | None, nonce: str | None, signature: str | None
) -> None:
    EXAMPLES["parse_headers"] += 1
    values = dict(zip(signing.HEADERS, (partner, timestamp, nonce, signature), strict=True))
    try:
        parsed = signing.parse_headers(values.get)
    except SignatureError as error:
        assert PROBLEM_TYPES[error.code].status == 401
        assert error.detail
        return
    assert signing.re.fullmatch(signing.PARTNER_ID_PATTERN, parsed.partner_id)
    assert 0 <= parsed.timestamp < 10**12
    assert signing.NONCE_LENGTH_MIN <= len(parsed.nonce) <= signing.NONCE_LENGTH_MAX
    assert parsed.signature


_partner_ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
_nonces = st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True)
_targets = st.builds(
    lambda path, query: path + ("?" + query if query else ""),
    st.from_regex(r"/[A-Za-z0-9/%._~-]{0,40}", fullmatch=True),
    st.from_regex(r"([a-z%0-9]{0,5}=[A-Za-z0-9%]{0,5}&?){0,4}", fullmatch=True),
)


@FUZZ
@given(
    partner=_partner_ids,
    nonce=_nonces,
    target=_targets,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    body=st.binary(max_size=200),
    secret=st.text(min_size=1, max_size=60),
    timestamp=st.integers(min_value=0, max_value=10**12 - 1),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_a_signature_verifies_only_its_own_request(
    partner: str,
    nonce: str,
    target: str,
    method: str,
    body: bytes,
    secret: str,
    timestamp: int,
    flip: int,
) -> None:
    EXAMPLES["sign_and_verify"] += 1
    headers = Signer.hmac(partner, secret).headers(
        method, target, body, timestamp=timestamp, nonce=nonce
    )
    parsed = signing.parse_headers(headers.get)
    assert (parsed.partner_id, parsed.timestamp, parsed.nonce) == (partner, timestamp, nonce)

    def message(**changes: object) -> bytes:
        fields: dict[str, object] = {
            "method": method,
            "target": target,
            "partner_id": partner,
            "timestamp": timestamp,
            "nonce": nonce,
            "body": body,
        }
        fields.update(changes)
        return signing.canonical_request(**fields)  # type: ignore[arg-type]

    secrets = [secret.encode()]
    assert signing.verify_hmac(secrets, message(), parsed.signature)
    assert signing.verify_hmac([b"other", *secrets], message(), parsed.signature)
    changed_body = bytearray(body or b"\x00")
    changed_body[flip % len(changed_body)] ^= 1 + flip % 255
    for changed in (
        message(body=bytes(changed_body)),
        message(timestamp=timestamp + 1),
        message(nonce=nonce[::-1] + "x"),
        message(target=target + "x"),
        message(method=method + "X"),
        message(partner_id=partner + "x"),
    ):
        assert not signing.verify_hmac(secrets, changed, parsed.signature)


@FUZZ
@given(
    parts=st.lists(st.from_regex(r"[a-z0-9%=]{0,6}", fullmatch=True), max_size=6), seed=st.randoms()
)
def test_canonical_query_ignores_order_and_empty_parts(parts: list[str], seed: object) -> None:
    EXAMPLES["canonical_query"] += 1
    shuffled = list(parts)
    seed.shuffle(shuffled)  # type: ignore[attr-defined]
    assert signing.canonical_query("&".join(parts)) == signing.canonical_query(
        "&&".join(shuffled) + "&"
    )


@FUZZ
@given(
    raw=st.one_of(st.none(), st.text(max_size=300), st.text(alphabet='"ab\x00\x7f é', max_size=8))
)
def test_idempotency_key_parser_accepts_or_refuses(raw: str | None) -> None:
    EXAMPLES["idempotency_key"] += 1
    try:
        key = parse_key(raw)
    except ProblemError as error:
        assert error.code in ("idempotency_key_missing", "idempotency_key_invalid")
        return
    assert 1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH_MAX
    assert key.isascii() and key.isprintable()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_public_key_loader_refuses_junk(text: str) -> None:
    EXAMPLES["load_public_key"] += 1
    with pytest.raises(ValueError):
        signing.load_public_key(text)
