"""Fixtures of the fault tests: see tests/faults/support.py."""

from tests.faults.support import client, cluster

__all__ = ["client", "cluster"]
