"""Network reachability, checked once and quickly, so that a machine without network fails in seconds.

Without HF_HUB_OFFLINE, a download from an unreachable Hub waits for its connection to time out (and
some of huggingface_hub's calls retry with back-off) before the run can say what is missing. A run
probes the Hub once instead: if it cannot connect within a few seconds, this process works offline
(the local cache only), as with HF_HUB_OFFLINE=1, and says so in one line.

How the process goes offline. huggingface_hub's switch is the HF_HUB_OFFLINE environment variable,
which it reads once, when it is imported, into ``huggingface_hub.constants.HF_HUB_OFFLINE``; its
``is_offline_mode()`` returns that value, and it has no setter (checked in huggingface_hub 2.4).
The probe runs long after the import, so:

- loaders that take the per-call switch get it: ``local_files_only=True`` for ``hf_hub_download``
  (``rewards.download.hub_file``), transformers' and diffusers' ``from_pretrained``
  (``rewards.hf_clip``, ``ddpo.models.loading``);
- open_clip's ``create_model`` takes no such argument and downloads a pretrained tag with
  ``hf_hub_download`` itself, so for it the constant is assigned, which is how huggingface_hub's
  maintainers say to change the mode at run time (huggingface/transformers#42308); the variable is
  set too, for subprocesses and this project's loaders.
"""

import logging
import os
import socket
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


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
    """Switch this process to offline mode if the Hub's endpoint cannot be reached; True when offline.

    Callers pass the result on as ``local_files_only`` where the loader takes it (see the module's note)."""
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    reason = unreachable(constants.ENDPOINT)
    if reason is None:
        return False
    log.warning(
        "the Hugging Face Hub is not reachable (%s): using the local cache only, as with HF_HUB_OFFLINE=1", reason
    )
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by this project's loaders and by subprocesses
    constants.HF_HUB_OFFLINE = True  # read by is_offline_mode(), at call time, inside open_clip's download
    return True
