"""The store layer: URLs, storages, lock-study names and the keys both sides share.

The runner (``studies``) writes the stores and ``reports`` / ``dashboards`` read them;
the readers must not import the runner, and both must use the same keys.
"""

from __future__ import annotations

import ast
import itertools
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from stores import keys
from stores.grid import expand_grid, grid_key
from stores.storage import (
    LOCK_SUFFIX,
    StudyNotFoundError,
    connect_storage,
    heartbeat_interval,
    is_lock_study,
    keep_alive,
    list_studies,
    load_study,
    lock_study_name,
    open_storage,
    stale_trial_ids,
    trial_id,
    trial_params,
)
from stores.urls import (
    default_storage_url,
    default_tracking_uri,
    describe,
    is_journal,
    is_local_store,
    is_server_uri,
    is_url,
    journal_path,
    sqlite_path,
    sqlite_url,
)

from .conftest import REPO, SPECS

READERS = ("reports", "dashboards", "stores")


# ---------------------------------------------------------------- no import cycle
def _loaded_after(code: str, packages: tuple[str, ...]) -> list[str]:
    """Which of ``packages`` a fresh interpreter has loaded after running ``code``."""
    probe = f"import sys\n{code}\nprint([p for p in {packages!r} if any(m.split('.')[0] == p for m in sys.modules)])"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_reports_and_dashboards_do_not_import_studies():
    code = "import reports, reports.loader, reports.study_report, dashboards, dashboards.build"
    assert _loaded_after(code, ("studies", "torch", "lightning")) == []


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, at any depth (inside
    functions too), as absolute dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", READERS)
def test_no_reader_module_imports_studies_anywhere(package):
    for path in sorted((REPO / package).rglob("*.py")):
        found = {m for m in _imported_modules(path) if m == "studies" or m.startswith("studies.")}
        assert not found, f"{path.relative_to(REPO)} imports {sorted(found)}"


def test_loading_a_spec_imports_no_torch():
    code = ("from studies.spec import load_spec\n"
            f"spec = load_spec({str(SPECS / 'gpt_pbw_demo.yaml')!r}, validate_configs=False)\n"
            "from lit_modules.config import AblationOptions\n"
            "assert type(spec.ablation) is AblationOptions")
    assert _loaded_after(code, ("torch", "lightning")) == []


def test_one_ablation_options_type():
    from lit_modules import ablation, config
    from studies.spec import load_spec

    assert ablation.AblationOptions is config.AblationOptions
    spec = load_spec(SPECS / "gpt_pbw_demo.yaml", validate_configs=False)
    assert isinstance(spec.ablation, config.AblationOptions)


# ---------------------------------------------------------------- URLs
@pytest.mark.parametrize("path", ["/tmp/runs/optuna.db", "relative/optuna.db", "/tmp/with space/o.db"])
def test_sqlite_url_round_trips(path):
    assert sqlite_path(sqlite_url(path)) == Path(path)
    assert sqlite_path(sqlite_url(path) + "?timeout=30") == Path(path)
    assert is_url(sqlite_url(path)) and not is_journal(sqlite_url(path))


def test_sqlite_path_reads_the_file_sqlalchemy_opens():
    from sqlalchemy.engine import make_url

    url = "sqlite:////tmp/a%20b/o.db?timeout=3"
    assert sqlite_path(url) == Path(make_url(url).database)
    assert sqlite_path("postgresql://u:p@host/db") is None
    assert sqlite_path("journal:/tmp/o.log") is None


def test_default_urls_name_files_in_the_output_dir(tmp_path):
    assert sqlite_path(default_storage_url(tmp_path)) == tmp_path / "optuna.db"
    assert sqlite_path(default_tracking_uri(tmp_path)) == tmp_path / "mlflow.db"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("url,path", [
    ("journal:/tmp/runs/o.log", "/tmp/runs/o.log"),
    ("journal:///tmp/runs/o.log", "/tmp/runs/o.log"),
    ("journal:runs/o.log", "runs/o.log"),
    ("runs/o.jsonl", "runs/o.jsonl"),
    ("/tmp/o.journal", "/tmp/o.journal"),
])
def test_journal_urls(url, path):
    assert is_journal(url) and is_url(url)
    assert journal_path(url) == Path(path)


def test_url_kinds():
    assert not is_journal("postgresql://u:p@db/masklab") and is_url("postgresql://u:p@db/masklab")
    assert not is_url("masklab-runs/optuna.db")
    assert is_server_uri("http://127.0.0.1:5000") and is_server_uri("https://mlflow.example")
    assert not is_server_uri("sqlite:///mlflow.db")
    for local in ("sqlite:///m.db", "file:///tmp/mlruns", "/tmp/mlruns", "mlruns"):
        assert is_local_store(local), local
    assert not is_local_store("http://127.0.0.1:5000") and not is_local_store("postgresql://db/m")
    assert describe("sqlite:///o.db") == "sqlite:///o.db"
    assert describe(optuna.storages.InMemoryStorage()) == "InMemoryStorage"


# ---------------------------------------------------------------- opening storages
def test_readers_create_nothing(tmp_path):
    for url in (sqlite_url(tmp_path / "o.db"), f"journal:{tmp_path / 'o.log'}"):
        with pytest.raises(StudyNotFoundError, match="does not exist"):
            open_storage(url)
    with pytest.raises(StudyNotFoundError, match="not an Optuna storage URL"):
        open_storage(str(tmp_path / "o.db"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_storage_workers_create_is_read_back(tmp_path, kind):
    url = sqlite_url(tmp_path / "o.db") if kind == "sqlite" else f"journal:{tmp_path / 'o.log'}"
    storage = connect_storage(url, heartbeat=7, grace=20)
    assert heartbeat_interval(storage) == (7 if kind == "sqlite" else None)
    optuna.create_study(study_name="s", storage=storage).set_user_attr(keys.KIND, "grid")
    assert load_study("s", url).user_attrs == {keys.KIND: "grid"}
    with pytest.raises(StudyNotFoundError, match=r"study 'x' not found in .*studies there: s"):
        load_study("x", url)
    if kind == "sqlite":  # local workers share the file: write-ahead log
        with sqlite3.connect(tmp_path / "o.db") as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


# ---------------------------------------------------------------- lock studies
def test_lock_study_names_and_listing(tmp_path):
    from studies.coordination import study_lock

    assert lock_study_name("gpt_pbw") == "gpt_pbw" + LOCK_SUFFIX
    assert is_lock_study(lock_study_name("gpt_pbw")) and not is_lock_study("gpt_pbw")
    url = sqlite_url(tmp_path / "o.db")
    storage = connect_storage(url, heartbeat=30, grace=90)
    optuna.create_study(study_name="b", storage=storage)
    optuna.create_study(study_name="a", storage=storage)
    with study_lock(storage, "a"):
        assert lock_study_name("a") in optuna.get_all_study_names(storage)
        assert list_studies(url) == ["a", "b"]
    assert optuna.get_all_study_names(storage) == ["b", "a"]


# ---------------------------------------------------------------- trials and heartbeats
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_trial_ids_and_queued_params(tmp_path):
    storage = connect_storage(sqlite_url(tmp_path / "o.db"), heartbeat=30, grace=90)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 1.0})
    for _ in range(3):
        study.ask()
    study.enqueue_trial({"x": 2.0})
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0]
    assert trial_params(waiting) == {"x": 2.0}
    for t in study.get_trials():
        assert trial_id(storage, "s", t.number) == t._trial_id  # the public lookup finds Optuna's id


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_keep_alive_records_heartbeats_while_the_block_runs(tmp_path):
    storage = connect_storage(sqlite_url(tmp_path / "o.db"), heartbeat=1, grace=2)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    with keep_alive(storage, "s", trial.number):
        time.sleep(2.5)
        assert stale_trial_ids(storage, "s") == []  # a heartbeat at most ~1 s ago
    time.sleep(2.5)
    assert stale_trial_ids(storage, "s") == [trial_id(storage, "s", trial.number)]


# ---------------------------------------------------------------- grid
def test_expand_grid_is_the_product_in_path_order():
    grid = {"model.depth": [2, 4], "masking.p_bw": [0.0, 0.1, 0.2]}
    points = expand_grid(grid)
    assert [tuple(p.values()) for p in points] == list(itertools.product(*grid.values()))
    assert all(list(p) == list(grid) for p in points)
    assert expand_grid({}) == [{}]
    assert grid_key({"b": 1, "a": 2.5}) == '{"a": 2.5, "b": 1}'


def test_spec_and_loader_expand_a_grid_alike():
    from reports.loader import grid_points
    from studies.spec import load_spec

    spec = load_spec(SPECS / "gpt_pbw_demo.yaml", validate_configs=False)
    from_spec = [p for p, seed in spec.grid_points() if seed == 0]
    assert grid_points(spec.to_dict()) == from_spec
    assert len(list(spec.grid_points())) == len(from_spec) * spec.replicates
    nested: dict = {}
    for path, values in spec.grid.items():
        section, name = path.split(".", 1)
        nested.setdefault(section, {})[name] = list(values)
    assert grid_points({"grid": nested}) == from_spec


# ---------------------------------------------------------------- keys
KEY = re.compile(r"masklab\.[a-z_]+")


def _key_literals(path: Path) -> list[str]:
    """String constants that are a masklab key or its prefix, or quote a key in an
    f-string (an MLflow filter): every key must come from stores.keys."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                KEY.fullmatch(node.value) or node.value == keys.PREFIX):
            found.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            found += [m for part in node.values if isinstance(part, ast.Constant)
                      for m in KEY.findall(str(part.value))]
    return found


@pytest.mark.parametrize("package", ["studies", "reports", "dashboards"])
def test_keys_are_written_and_read_only_through_stores_keys(package):
    for path in sorted((REPO / package).rglob("*.py")):
        assert not _key_literals(path), f"{path.relative_to(REPO)} spells out {_key_literals(path)}"


def test_keys_are_distinct_and_prefixed():
    values = {name: v for name, v in vars(keys).items() if name.isupper() and isinstance(v, str)}
    mine = {n: v for n, v in values.items() if v.startswith(keys.PREFIX) and n != "PREFIX"}
    assert len(set(mine.values())) == len(mine)
    assert len(mine) >= 37
    assert set(keys.ATTEMPT_ATTRS) <= set(mine.values())
    assert keys.PARENT_RUN_TAG == "mlflow.parentRunId"


def test_what_the_runner_writes_the_loader_reads(tmp_path):
    """A study opened and queued by the runner, read back by the loader (no training)."""
    from reports.loader import load_study as load
    from studies.runner import enqueue_grid, open_study
    from studies.spec import load_spec

    spec = load_spec(SPECS / "gpt_pbw_demo.yaml", validate_configs=False)
    url = sqlite_url(tmp_path / "o.db")
    study = open_study(spec, url, sqlite_url(tmp_path / "mlflow.db"))
    added = enqueue_grid(study, spec)
    trial = study.ask()
    trial.set_user_attr(keys.FAILURE, "a reason")
    trial.set_user_attr(keys.CONFIG_HASH, "abc")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    data = load(spec.name, url, with_mlflow=False)
    assert (data.kind, data.swept, data.objective, data.direction) == (
        spec.kind, spec.swept, spec.objective.metric, spec.objective.direction)
    assert data.tracking_uri == sqlite_url(tmp_path / "mlflow.db")
    assert data.spec == spec.to_dict()
    assert len(data.trials) == added
    row = data.trials.set_index("number").loc[trial.number]
    assert (row["failure"], row["config_hash"]) == ("a reason", "abc")
    assert row["grid_key"] == study.trials[trial.number].user_attrs[keys.GRID_KEY]
    assert set(data.trials["replicate"]) == set(range(spec.replicates))
