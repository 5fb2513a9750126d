"""Serve a reward over HTTP (protocol 1 of ``rewards/remote.py``; README "Remote rewards").

The code is ``ddpo/tools/reward_server.py``, which an installed copy runs as ``ddpo-reward-server``; this file
runs it in a clone (``python scripts/reward_server.py --help``), with the same options.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpo.tools.reward_server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
