"""QR images of a payload, drawn by segno (pure Python: PNG and SVG without Pillow)."""

from __future__ import annotations

import io
from typing import Final

import segno

PNG_MODULE_PX: Final = 8  # pixels per module: about 300 px for an order's code
SVG_MODULE_UNITS: Final = 8
QUIET_ZONE_MODULES: Final = 4  # the white border every scanner needs
PAYLOAD_LENGTH_MAX: Final = 256


def _code(payload: str) -> segno.QRCode:
    assert 1 <= len(payload) <= PAYLOAD_LENGTH_MAX, len(payload)
    # Level M survives 15 % damage (a phone screen's glare, a creased print-out).
    return segno.make_qr(payload, error="m")


def png(payload: str) -> bytes:
    out = io.BytesIO()
    _code(payload).save(out, kind="png", scale=PNG_MODULE_PX, border=QUIET_ZONE_MODULES)
    return out.getvalue()


def svg(payload: str) -> bytes:
    out = io.BytesIO()
    # A white background, so the code also scans when shown on a dark page.
    _code(payload).save(
        out, kind="svg", scale=SVG_MODULE_UNITS, border=QUIET_ZONE_MODULES, light="#fff"
    )
    return out.getvalue()
