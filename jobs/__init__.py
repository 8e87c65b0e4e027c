"""Training entrypoints (`python -m jobs.<name>`), the shared runner and the sweep driver.

`ray job submit --working-dir .` puts the repository root on the path but not `platform/`,
where the `kiln` package lives; adding it here makes a submitted job (and its Ray workers, which
import this package first) run the kiln code it was submitted with, installed or not.
"""

import sys
from pathlib import Path

_PLATFORM = Path(__file__).resolve().parent.parent / "platform"
if (_PLATFORM / "kiln").is_dir() and str(_PLATFORM) not in sys.path:
    sys.path.insert(0, str(_PLATFORM))
