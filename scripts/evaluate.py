"""Evaluate a run (base vs trained) or a base model on fixed held-out prompts x fixed seeds.

The code is ``ddpo/tools/evaluate.py``, which an installed copy runs as ``ddpo-evaluate``; this file runs it
in a clone (``python scripts/evaluate.py --help``), with the same options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpo.tools.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
