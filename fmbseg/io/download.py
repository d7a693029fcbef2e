"""HTTP(S) downloads that resume, verify a hash before use, and never leave a partial file.

Also the quick reachability probe that lets offline machines fail in seconds instead of
waiting for a library's long network time-out.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from fmbseg.errors import FmbsegError
from fmbseg.io.atomic import sha256_file

OFFLINE_ENV = "FMBSEG_OFFLINE"


class DownloadError(FmbsegError):
    """A download that could not be made or verified."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline_reason(url: str) -> str | None:
    """Why ``url`` must not be tried at all (an offline switch is set), or None."""
    if _truthy(os.environ.get(OFFLINE_ENV)):
        return f"{OFFLINE_ENV} is set"
    host = urlparse(url).hostname or ""
    if host.endswith("huggingface.co") and _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE is set"
    return None


def unreachable_reason(url: str, timeout: float = 3.0) -> str | None:
    """A short reason when ``url``'s host cannot be reached within ``timeout`` s, else None."""
    reason = offline_reason(url)
    if reason is not None:
        return reason
    parsed = urlparse(url)
    if not parsed.hostname:
        return f"not a URL: {url!r}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parsed.hostname}:{port} unreachable ({exc.__class__.__name__}: {exc})"


def _verify(path: Path, url: str, sha256: str | None) -> str:
    digest = sha256_file(path)
    if sha256 is not None and not digest.startswith(sha256.lower()):
        raise DownloadError(
            f"{url}: downloaded file has sha256 {digest[:16]}..., expected {sha256[:16]}..."
        )
    return digest


def download_file(
    url: str, dest: str | Path, sha256: str | None = None, timeout: float = 30.0
) -> str:
    """Fetch ``url`` into ``dest`` and return the file's sha256.

    ``sha256`` may be a whole digest or a prefix (as in torch-hub file names); a mismatch
    deletes the download. An interrupted download continues from ``dest.part``.
    """
    target = Path(dest)
    if target.exists():
        return _verify(target, url, sha256)
    reason = unreachable_reason(url, timeout=min(timeout, 3.0))
    if reason is not None:
        raise DownloadError(f"{url}: cannot download ({reason})")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = offset > 0 and response.status == 206
            with open(part, "ab" if resumed else "wb") as handle:
                shutil.copyfileobj(response, handle, length=1 << 20)
            if response.length:  # bytes the server announced but never sent
                raise DownloadError(
                    f"{url}: connection closed {response.length} bytes early; rerun to resume"
                )
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(f"{url}: download failed ({exc!r}); rerun to resume") from None
    try:
        digest = _verify(part, url, sha256)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return digest
