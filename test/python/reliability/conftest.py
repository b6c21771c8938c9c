"""Reliability suite: differential, corruption and environment tests (see docs/reliability.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # helper modules next to the tests


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long differential runs (the full OpInfo suite); deselected in CI with -m 'not slow'")
