import sys
from pathlib import Path

# Make the test-only helpers (the MONAI oracle) importable as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
