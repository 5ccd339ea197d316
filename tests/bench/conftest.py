"""HTTP fixtures for the dashboard tests: see tests/gateway/support.py."""

from tests.gateway.support import api, world

__all__ = ["api", "world"]
