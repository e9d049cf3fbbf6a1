"""Where generated output goes and where data is found.

All generated output (MLflow store, Optuna DB, tokenizer cache, checkpoints, reports)
lives under one output directory: ``--output-dir``, else ``$MASKLAB_OUTPUT_DIR``, else
``./masklab-runs``. Data files are looked up under ``--data-dir``, else
``$MASKLAB_DATA_DIR``, else ``./data`` if that folder exists, else the ``shared/data``
folder beside the checkout (``../shared/data`` from the repository root), where the
project's real data sits.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config_errors import ConfigError

DEFAULT_OUTPUT_DIR = "masklab-runs"
DEFAULT_DATA_DIR = "data"
# The checkout's sibling data folder: <repo>/../shared/data.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_data_dir() -> Path:
    """``./data`` where it exists, else the shared data folder beside the checkout."""
    local = Path(DEFAULT_DATA_DIR)
    return local if local.is_dir() or not SHARED_DATA_DIR.is_dir() else SHARED_DATA_DIR


@dataclass(frozen=True)
class Workspace:
    output_dir: Path
    data_dir: Path

    @classmethod
    def resolve(cls, output_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None) -> Workspace:
        out = output_dir or os.environ.get("MASKLAB_OUTPUT_DIR") or DEFAULT_OUTPUT_DIR
        data = data_dir or os.environ.get("MASKLAB_DATA_DIR") or default_data_dir()
        return cls(Path(out).expanduser().resolve(), Path(data).expanduser().resolve())

    @property
    def cache_dir(self) -> Path:
        return self._mkdir(self.output_dir / "cache")

    @property
    def checkpoint_dir(self) -> Path:
        return self._mkdir(self.output_dir / "checkpoints")

    @property
    def artifact_dir(self) -> Path:
        return self._mkdir(self.output_dir / "mlartifacts")

    @property
    def tracking_uri(self) -> str:
        """Default MLflow store: a sqlite file in the output dir."""
        self._mkdir(self.output_dir)
        return f"sqlite:///{self.output_dir / 'mlflow.db'}"

    def data_file(self, relative: str, field: str = "data.path", dataset: str | None = None) -> Path:
        """A file under the data dir; a clear error naming the path if it is missing."""
        path = Path(relative).expanduser()
        if not path.is_absolute():
            path = self.data_dir / path
        if not path.exists():
            how = (
                f"run `masklab data fetch {dataset}` or " if dataset else ""
            ) + "point --data-dir / MASKLAB_DATA_DIR at the folder that holds it"
            raise ConfigError(field, str(path), f"file not found; {how}")
        return path

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------- cache files
@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed over ``path`` when the block
    succeeds, removed when it fails. Workers sharing a cache never read a half-written
    file, and an interrupted write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
