"""``masklab data fetch NAME``: download a named corpus into the data dir, sha256-checked.

Each file goes to a temporary file next to its target, is optionally normalized
(CRLF -> LF), has its sha256 checked, and only then is renamed into place, so the data
dir never holds a partial or unverified file. A file already present with the right
hash is not downloaded again. ``mirror`` fetches ``<mirror>/<relative_path>`` instead of
the public URL (an http(s)/file URL, or a local folder laid out like the data dir).

Only the standard library is used (``urllib.request``); nothing runs at import time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config_errors import ConfigError

# Read and hash in 64 KiB pieces: small enough to stream, large enough to be fast.
CHUNK_BYTES = 1 << 16
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a corpus.

    ``relative_path`` is where it lives under the data dir (the path the dataset
    registry in ``lit_modules/data/text.py`` reads); ``sha256`` is the hash of the file
    as *stored*, i.e. after the CRLF -> LF normalization when ``crlf_to_lf`` is set.
    """

    relative_path: str
    url: str
    sha256: str
    crlf_to_lf: bool = False


_CHAR_RNN = "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e"
# The raw WikiText-2 files were removed from this repository in later commits, so the
# URL pins the commit that still has them. They are committed with CRLF line ends
# (remote sha256: valid f117e548...a551a, test e4fbb284...3e90); the sha256 below is
# of the stored file after CRLF -> LF, which is byte-identical to the shared copy
# (and to the LF files of the Hugging Face wikitext-2-raw-v1 export).
_LLM_HUMAN = "https://raw.githubusercontent.com/DRAGNLabs/LLMHumanModeling/379149361c70592030e47c6df842d43f547dfd43"

SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "tinyshakespeare": (
        RemoteFile(
            "tinyshakespeare/input.txt",
            f"{_CHAR_RNN}/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
    ),
    "wikitext-2": (
        RemoteFile(
            "wikitext-2/raw/wiki.valid.raw",
            f"{_LLM_HUMAN}/data/wiki.valid.raw",
            "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
            crlf_to_lf=True,
        ),
        RemoteFile(
            "wikitext-2/raw/wiki.test.raw",
            f"{_LLM_HUMAN}/data/wiki.test.raw",
            "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
            crlf_to_lf=True,
        ),
    ),
}


def fetch(
    name: str,
    data_dir: str | os.PathLike,
    mirror: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Path]:
    """Download every file of corpus ``name`` into ``data_dir``; return their paths.

    Raises ``ConfigError`` (one line) for an unknown name, a failed download (naming
    the URL) or a sha256 mismatch (nothing is stored; an existing file is untouched).
    """
    if name not in SOURCES:
        raise ConfigError("dataset", name, f"no download known; allowed: {', '.join(sorted(SOURCES))}")
    root = Path(data_dir).expanduser()
    paths = []
    for remote in SOURCES[name]:
        target = root / remote.relative_path
        if not (target.is_file() and _sha256_file(target) == remote.sha256):
            _download(remote, _url_for(remote, mirror), target, timeout)
        paths.append(target)
    return paths


def _url_for(remote: RemoteFile, mirror: str | None) -> str:
    if not mirror:
        return remote.url
    if "://" not in mirror:  # a local folder laid out like the data dir
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{remote.relative_path}"


def _download(remote: RemoteFile, url: str, target: Path, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``target``; rename it in place if verified."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    got = _copy(response, out, remote.crlf_to_lf)
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise ConfigError(
                    "url", url,
                    f"download failed ({_reason(e)}); check the connection, "
                    "or fetch from another host with --mirror BASE (files at BASE/<relative path>)",
                ) from None
        if got != remote.sha256:
            raise ConfigError(
                f"sha256 of {remote.relative_path}", got,
                f"expected {remote.sha256} (downloaded from {url}); nothing was stored",
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a data file is world-readable
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy(src: BinaryIO, out: BinaryIO, crlf_to_lf: bool) -> str:
    """Copy ``src`` to ``out`` (CRLF -> LF if asked); the sha256 of what was written."""
    digest = hashlib.sha256()
    held = b""  # a trailing b"\r" kept back in case the next chunk starts with b"\n"
    while chunk := src.read(CHUNK_BYTES):
        if crlf_to_lf:
            chunk = held + chunk
            held = b"\r" if chunk.endswith(b"\r") else b""
            chunk = chunk[: len(chunk) - len(held)].replace(b"\r\n", b"\n")
        digest.update(chunk)
        out.write(chunk)
    digest.update(held)
    out.write(held)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(e: BaseException) -> str:
    """A one-line cause of a download failure."""
    if isinstance(e, urllib.error.HTTPError):
        text = f"HTTP {e.code} {e.reason}"
    elif isinstance(e, urllib.error.URLError):
        text = str(e.reason)
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())
