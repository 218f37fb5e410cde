import sys
from pathlib import Path

# Let tests import the multi-process harness (tests/distributed.py) by name.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` (tens of seconds each) are collected first, so that pytest-xdist
    hands them out at the start and the short tests fill the end: the workers finish together
    instead of one running a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise as collected
