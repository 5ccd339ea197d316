"""Webhook signatures: Stripe's scheme, and the verification that README gives partners."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from engine.products import signatures

README = Path(__file__).resolve().parents[3] / "README.md"
BODY = b'{"id":"1","object":"event"}'


def _readme_verify() -> Any:
    """The verification function partners are told to copy, run as written."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (code,) = [b for b in blocks if "def verify(" in b]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    return namespace["verify"]


def test_the_readme_verification_accepts_what_the_dispatcher_signs_and_nothing_else() -> None:
    readme_verify = _readme_verify()
    now = int(time.time())
    old, new = "whsec_" + "a" * 64, "whsec_" + "b" * 64
    header = signatures.signature_header([new, old], now, BODY)
    for verify in (readme_verify, signatures.verify):
        assert verify(header, BODY, [old])
        assert verify(header, BODY, [new])
        assert not verify(header, BODY, ["whsec_" + "c" * 64])
        assert not verify(header, BODY + b" ", [new])
        assert not verify(header.replace(f"t={now}", f"t={now + 1}"), BODY, [new])
        assert not verify(signatures.signature_header([new], now - 301, BODY), BODY, [new])
        assert verify(signatures.signature_header([new], now - 250, BODY), BODY, [new])
        assert not verify("v1=" + signatures.sign(new, now, BODY), BODY, [new])  # no t
        assert not verify(f"t={now}", BODY, [new])  # no signature
        assert not verify("", BODY, [new])


def test_the_signature_is_the_hmac_of_timestamp_dot_body() -> None:
    # A fixed vector (openssl dgst -sha256 -hmac whsec_test), so that a change of the
    # scheme cannot pass unnoticed.
    assert signatures.sign("whsec_test", 1700000000, b"{}") == (
        "35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
    )
