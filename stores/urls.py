"""Storage and tracking URLs, parsed without importing Optuna or MLflow.

Optuna storages: ``sqlite:///PATH`` (the default: ``optuna.db`` in the output dir),
any other SQLAlchemy URL (``postgresql://...`` on a cluster), a journal file:
``journal:PATH``, or a path ending in ``.log`` / ``.journal`` / ``.jsonl``, or a gRPC
storage proxy in front of one (``grpc://host:port``, ``masklab storage-proxy``).
MLflow tracking stores: ``sqlite:///PATH`` (the default: ``mlflow.db``), a local
path or ``file:`` URI, or a tracking server (``http(s)://``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

SQLITE_PREFIX = "sqlite:///"
JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
OPTUNA_DB = "optuna.db"  # the default Optuna storage, in the output dir
MLFLOW_DB = "mlflow.db"  # the default MLflow store, in the output dir


def sqlite_url(path: str | Path) -> str:
    return f"{SQLITE_PREFIX}{path}"


def default_storage_url(output_dir: Path) -> str:
    """The Optuna storage of an output dir: a sqlite file in it."""
    return sqlite_url(output_dir / OPTUNA_DB)


def default_tracking_uri(output_dir: Path) -> str:
    """The MLflow store of an output dir: a sqlite file in it (nothing is created)."""
    return sqlite_url(output_dir / MLFLOW_DB)


def is_journal(url: str) -> bool:
    """A journal-file storage: ``journal:PATH`` or a path with a journal ending."""
    return url.startswith(JOURNAL_PREFIX) or url.endswith(JOURNAL_SUFFIXES)


def journal_path(url: str) -> Path:
    return Path(url.removeprefix(JOURNAL_PREFIX).removeprefix("//"))


GRPC_PREFIX = "grpc://"


def is_grpc(url: str) -> bool:
    """A gRPC storage proxy (``masklab storage-proxy``): ``grpc://host:port``."""
    return isinstance(url, str) and url.startswith(GRPC_PREFIX)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, as SQLAlchemy reads it (percent-escapes
    decoded, query dropped); None for other URLs."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    return Path(unquote(url.removeprefix(SQLITE_PREFIX).split("?", 1)[0]))


def is_in_memory(path: Path) -> bool:
    """A sqlite "file" that is no file: ``sqlite:///:memory:`` or ``sqlite:///``."""
    return str(path) in ("", ".", ":memory:")


def is_url(url: str) -> bool:
    """Something an Optuna storage can be opened from (a journal file or a URL)."""
    return is_journal(url) or "://" in url


def is_server_uri(tracking_uri: str) -> bool:
    """A tracking URI that is itself a tracking server (whose UI is at the same address)."""
    return tracking_uri.startswith(("http://", "https://"))


def is_local_store(tracking_uri: str) -> bool:
    """A tracking store on this machine (sqlite, a path, ``file:``): its artifacts go
    where masklab says; a server chooses its own."""
    return tracking_uri.startswith(("sqlite:", "file:", "/")) or "://" not in tracking_uri


def describe(storage: object) -> str:
    """A storage for messages: its URL without a password, or the kind of storage object."""
    if isinstance(storage, str):
        return redact(storage)
    shown = getattr(storage, "describe", None)
    return shown if isinstance(shown, str) else type(storage).__name__


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "secret", "sslpassword")


def redact(url: str) -> str:
    """The URL with its password (in the user part or the query) shown as ``***``:
    ``postgresql://masklab:***@db.cluster/masklab_optuna``. What masklab records,
    logs and prints in place of a store URL."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not isinstance(url, str) or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # untouched (urlunsplit would also normalise sqlite:////abs/path)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):[^\s@/'\"]+@")


def _secrets(url: str) -> list[str]:
    """The password of ``url`` (as written and percent-decoded) and its secret query values."""
    from urllib.parse import parse_qsl, urlsplit

    if not isinstance(url, str) or "://" not in url:
        return []
    parts = urlsplit(url)
    found = []
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
        raw = netloc.rsplit("@", 1)[0].split(":", 1)[1]
        found += [raw, unquote(raw)]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS]
    return [s for s in dict.fromkeys(found) if len(s) >= 3]


STORE_ENV = ("MASKLAB_STORAGE", "MASKLAB_TRACKING_URI")  # where store URLs with passwords come from


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (an error message, a log line) with no password in it: every password of
    ``urls`` and of the stores in the environment (``MASKLAB_STORAGE``,
    ``MASKLAB_TRACKING_URI``) shown as ``***`` wherever it appears, and so is the password
    of any other ``scheme://user:password@host`` in it. For messages made by other
    libraries (SQLAlchemy, psycopg, MLflow) that may quote a URL they were given."""
    import os

    for url in (*urls, *(os.environ.get(k) for k in STORE_ENV)):
        for secret in _secrets(url or ""):
            text = text.replace(secret, "***")
    return _USERINFO_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)


def has_secret(url: str) -> bool:
    """Whether the URL carries a password (see :func:`redact`)."""
    return isinstance(url, str) and redact(url) != url
