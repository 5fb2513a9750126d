"""Export a finished run (or one of its checkpoints) as a Hub-ready model folder.

The code is ``ddpo/tools/export.py``, which an installed copy runs as ``ddpo-export``; this file runs it
in a clone (``python scripts/export.py --help``), with the same options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpo.tools.export import cli  # noqa: E402

if __name__ == "__main__":
    cli()
