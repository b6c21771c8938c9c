"""Suite-wide pytest configuration: the `slow` marker (see docs/reliability.md) and the
`fresh_dynamo` fixture."""
import os

import pytest
import torch

# lowbit's persistent compile cache (compiler/compile_cache.py) stays off in tests: no writes to
# the user's home, and compile counters mean what the tests expect. Cache tests turn it on
# with a temporary LOWBIT_CACHE_DIR.
os.environ.setdefault("LOWBIT_CACHE", "0")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long runs (full differential suites, real-size models); run only with -m slow")


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when the -m expression names them (e.g. -m slow): the plain
    suite (scripts/test.sh, CI) stays within its time budget."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches emptied before and after the test: tests that compile new models through
    the same forward code would otherwise reuse each other's graphs and share recompile limits
    (counted per code object). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
