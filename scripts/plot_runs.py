"""Compare the runs of a sweep: reward per epoch, one line per job, and a CSV summary.

The code is ``ddpo/tools/plot_runs.py``, which an installed copy runs as ``ddpo-plot``; this file runs it
in a clone (``python scripts/plot_runs.py --help``), with the same options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpo.tools.plot_runs import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
