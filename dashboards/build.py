"""Stores -> dashboard page: load the studies through ``reports.loader`` and write the page.

    path = write_dashboard(load_dashboard("sqlite:///masklab-runs/optuna.db"), "masklab-runs/dashboard.html")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from reports.loader import load_study
from stores.storage import StudyNotFoundError, list_studies, open_storage
from stores.urls import redact, scrub

from .content import Dashboard, assemble
from .page import render_page

DASHBOARD_HTML = "dashboard.html"


def load_dashboard(storage_url: str, tracking_uri: str | None = None,
                   names: Sequence[str] | None = None) -> Dashboard:
    """The dashboard of studies ``names`` (every study in the storage when None).

    A storage that does not exist yet, or holds no study, gives a dashboard that says so;
    a named study that is not there is listed as not found, the others are shown. The
    page names the stores without their passwords.
    """
    shown = redact(storage_url)
    try:
        storage = open_storage(storage_url)  # opened once for all the studies
    except StudyNotFoundError as e:
        return assemble([], storage_url, tracking_uri, empty=f"{scrub(str(e), storage_url)}: "
                                                            "run a study first (masklab run SPEC).")
    present = list_studies(storage)
    empty = "" if present else f"No studies in {shown} yet: run one first (masklab run SPEC)."
    names = present if names is None else list(names)
    studies, not_found = [], []
    for name in names:
        if name not in present:
            there = ", ".join(present) or "none"
            not_found.append(f"study {name!r} is not in {shown} (studies there: {there})")
            continue
        data = load_study(name, storage, tracking_uri)
        studies.append(dataclasses.replace(data, storage_url=shown))
    if names and not studies:
        empty = f"None of the studies asked for is in {shown}."
    return assemble(studies, storage_url, tracking_uri, not_found, empty)


def write_dashboard(dash: Dashboard, path: str | Path) -> tuple[Path, str]:
    """Write the page of ``dash`` to ``path``; return the path and the page's version stamp."""
    text, version = render_page(dash)
    return write_page(path, text), version


def write_page(path: str | Path, text: str) -> Path:
    """Write a page atomically (a browser or server never reads half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
