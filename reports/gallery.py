"""Reconstruction gallery: the latest ``reconstructions/*.png`` artifact of the best
complete trial of each setting (MAE and video models log one at every validation).

Read from the MLflow store only; images are embedded in the HTML report as base64, so
the page stays self-contained.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .loader import StudyData

ARTIFACT_DIR = "reconstructions"
MAX_SETTINGS = 12


@dataclass(frozen=True)
class GalleryImage:
    setting: str
    number: int
    seed: object
    artifact: str
    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


def reconstruction_gallery(data: StudyData) -> list[GalleryImage]:
    done = data.complete
    if done.empty or not data.tracking_uri or "run_id" not in done.columns:
        return []
    if not done["run_id"].map(lambda r: isinstance(r, str) and bool(r)).any():
        return []  # no runs were found: opening the client would create an empty store
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in a report
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=data.tracking_uri)
    best = done.sort_values("value", ascending=data.direction != "maximize", kind="stable")
    best = best.drop_duplicates("setting").head(MAX_SETTINGS)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in best.itertuples(index=False):
            run_id = getattr(row, "run_id", None)
            if not isinstance(run_id, str) or not run_id:
                continue
            try:
                pngs = sorted(a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR) if a.path.endswith(".png"))
                if not pngs:
                    continue
                local = Path(client.download_artifacts(run_id, pngs[-1], tmp))
            except Exception:  # a missing artifact store leaves the gallery shorter, not broken
                continue
            out.append(GalleryImage(row.setting, int(row.number), getattr(row, "seed", None), pngs[-1],
                                    local.read_bytes()))
    return out
