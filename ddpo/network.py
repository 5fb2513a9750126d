"""Network reachability, checked once and quickly, so that a machine without network fails in seconds.

Without HF_HUB_OFFLINE, huggingface_hub retries an unreachable Hub with back-off (about half a minute
per file) before the run can say what is missing. A run probes the Hub once instead: if it cannot
connect within a few seconds, this process works offline (the local cache only), as with
HF_HUB_OFFLINE=1, and says so in one line.
"""

import logging
import os
import socket
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``url``'s host cannot be opened, or None when it can."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return f"no host in {url!r}"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:  # name resolution, refused, timed out, no route
        return f"{host}:{port} unreachable ({error.strerror or type(error).__name__})"


def work_offline_unless_hub_reachable() -> bool:
    """Switch huggingface_hub to offline mode if its endpoint cannot be reached; True when offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    reason = unreachable(constants.ENDPOINT)
    if reason is None:
        return False
    log.warning(
        "the Hugging Face Hub is not reachable (%s): using the local cache only, as with HF_HUB_OFFLINE=1", reason
    )
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by this project's loaders
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub, transformers, diffusers and open_clip at call time
    return True
