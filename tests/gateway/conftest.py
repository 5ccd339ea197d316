"""Fixtures for HTTP tests: see tests/gateway/support.py."""

from tests.gateway.support import api, shared, world

__all__ = ["api", "shared", "world"]
