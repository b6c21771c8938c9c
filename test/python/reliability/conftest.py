"""Reliability suite: differential, corruption and environment tests (see docs/reliability.md).

The `slow` marker is defined suite-wide in test/python/conftest.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # helper modules next to the tests
