"""Getting reward weights onto disk: verified downloads into a cache, Hub files, offline mode.

A downloaded file is written to a temporary file next to its destination and renamed into
place only after its sha256 matches, so a cache never holds a truncated or foreign file.
Every failure a user can fix is a one-line ``ConfigError`` that says how to fix it.

The transfers are libraries': a Hub file comes through ``huggingface_hub.hf_hub_download``
(its cache, its resumable download, HF_HUB_OFFLINE), a file elsewhere (the LAION head's
upstream on GitHub) through httpx2. What stays here is what they do not do: ``hf_hub_download``
checks a file's size but no pinned sha256 (a branch such as ``main`` may change under it), and
a URL has no library cache, so :func:`fetch_verified` pins the content and tries the sources
in order.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddpo.errors import ConfigError
from ddpo.network import unreachable, work_offline_unless_hub_reachable

from .base import first_line

_TRUE = {"1", "true", "yes", "on"}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ddpo``, or ``~/.cache/ddpo`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "ddpo"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access (read at call time, not import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url: str, dest, timeout: float, max_bytes: int | None = None) -> None:
    """Stream ``url`` into ``dest`` with httpx2 (redirects followed, as GitHub's raw links need);
    ``timeout`` bounds every network operation, ``max_bytes`` the size."""
    import httpx2

    written = 0
    with (
        httpx2.stream("GET", url, headers={"User-Agent": "ddpo-rewards"}, timeout=timeout, follow_redirects=True) as r,
        open(dest, "wb") as out,
    ):
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 16):
            written += len(chunk)
            if max_bytes is not None and written > max_bytes:
                raise OSError(f"download exceeds the expected {max_bytes} bytes")
            out.write(chunk)


def hub_file(repo_id: str, filename: str, revision: str | None = None, cache_dir=None) -> str:
    """Path of a Hub file in the Hugging Face cache, downloading it unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import hf_hub_download

    work_offline_unless_hub_reachable()
    return hf_hub_download(
        repo_id,
        filename,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=hub_offline(),
    )


@dataclass(frozen=True)
class UrlSource:
    url: str
    timeout: float = 60.0

    def fetch_to(self, dest, max_bytes: int | None = None) -> None:
        reason = unreachable(self.url)  # in seconds, not after the full timeout of a hanging connection
        if reason:
            raise OSError(reason)
        fetch_url(self.url, dest, self.timeout, max_bytes)

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    filename: str
    revision: str | None = None

    def fetch_to(self, dest, max_bytes: int | None = None) -> None:
        shutil.copyfile(hub_file(self.repo_id, self.filename, self.revision), dest)

    def __str__(self) -> str:
        return f"hf://{self.repo_id}/{self.filename}@{self.revision or 'main'}"


def verify_sha256(path, sha256: str | None, size: int | None, what: str, fix: str) -> None:
    """Refuse ``path`` with a one-line ConfigError unless its size and sha256 are the expected ones."""
    if sha256 is None:
        return
    actual_size = os.path.getsize(path)
    if size is not None and actual_size != size:
        raise ConfigError(
            f"{what} {path} has {actual_size} bytes, expected {size} (sha256 {sha256}): "
            f"it is truncated or a different file; {fix}"
        )
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise ConfigError(
            f"{what} {path} has sha256 {actual}, expected {sha256}: it is corrupted or a different file; {fix}"
        )


def fetch_verified(
    filename: str,
    cache_dir,
    sources,
    *,
    sha256: str | None,
    size: int | None,
    what: str,
    fix: str,
) -> Path:
    """Return ``cache_dir/filename``, downloading it from the first source that yields the right file.

    A cached file is verified too and refused if it does not match. With HF_HUB_OFFLINE set,
    URL sources are skipped and Hub sources only read the local Hugging Face cache.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / filename
    if target.is_file():
        verify_sha256(target, sha256, size, f"cached {what}", f"delete it to download again or {fix}")
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the cache dir {cache_dir} for {what} ({first_line(error)}); {fix}") from None

    failures = []
    max_bytes = None if size is None else size + 1
    for source in sources:
        if hub_offline() and isinstance(source, UrlSource):
            failures.append(f"{source}: skipped, HF_HUB_OFFLINE is set")
            continue
        handle, partial = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=cache_dir)
        os.close(handle)
        try:
            source.fetch_to(partial, max_bytes)
            verify_sha256(partial, sha256, size, f"{what} downloaded from {source}", fix)
            os.replace(partial, target)
            return target
        except Exception as error:  # any failure of one source: try the next one
            failures.append(f"{source}: {first_line(error, 160)}")
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise ConfigError(
        f"{what} '{filename}' is not in {cache_dir} and could not be downloaded "
        f"({'; '.join(failures) or 'no sources'}); put the file there or {fix}"
    )
