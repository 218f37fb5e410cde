import sys
from pathlib import Path

# Let tests import the multi-process harness (tests/distributed.py) by name.
sys.path.insert(0, str(Path(__file__).parent))
