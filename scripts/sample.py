"""Sample an image grid from a base model plus a run's trained weights.

The code is ``ddpo/tools/sample.py``, which an installed copy runs as ``ddpo-sample``; this file runs it
in a clone (``python scripts/sample.py --help``), with the same options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpo.tools.sample import main  # noqa: E402

if __name__ == "__main__":
    main()
