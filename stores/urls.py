"""Storage and tracking URLs, parsed without importing Optuna or MLflow.

Optuna storages: ``sqlite:///PATH`` (the default: ``optuna.db`` in the output dir),
any other SQLAlchemy URL (``postgresql://...`` on a cluster), or a journal file:
``journal:PATH``, or a path ending in ``.log`` / ``.journal`` / ``.jsonl``.
MLflow tracking stores: ``sqlite:///PATH`` (the default: ``mlflow.db``), a local
path or ``file:`` URI, or a tracking server (``http(s)://``).
"""

from __future__ import annotations

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
    """A storage for messages: its URL, or the kind of storage object."""
    return storage if isinstance(storage, str) else type(storage).__name__
