"""reports/: the loader reads synthetic stores written exactly as the runner writes them
(Optuna study + MLflow parent and child runs + ablation.csv), and the report renders them."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pytest

from reports.findings import findings_frame
from reports.loader import StudyNotFoundError, list_studies, load_study
from reports.study_report import build_report, summary_table, write_report

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
GRID = "gpt_pbw"
SEARCH = "mlm_search"
EMPTY = "nothing_done"
DEPTH = 2
# (p_bw, seed) -> final (val/fw_loss, val/bw_loss). p_bw=0.5 has bw < fw: the report must flag it.
GRID_RESULTS = {
    (0.0, 0): (3.0, 5.0), (0.0, 1): (3.2, 5.2),
    (0.5, 0): (3.1, 2.9), (0.5, 1): (3.3, 3.0),
}
REPLICATES = 3  # the spec asks for 3; each setting has 2 complete, so both are short
D = optuna.distributions
DISTRIBUTIONS = {
    "masking.p_bw": D.CategoricalDistribution([0.0, 0.5]), "seed": D.CategoricalDistribution([0, 1, 2]),
    "model.depth": D.CategoricalDistribution([2, 4]), "model.width": D.CategoricalDistribution([32, 64]),
    "optim.lr": D.FloatDistribution(1e-4, 1e-2, log=True),
}


# ------------------------------------------------------------------ synthetic stores
class Stores:
    def __init__(self, root: Path):
        from mlflow.tracking import MlflowClient

        self.root = root
        self.storage_url = f"sqlite:///{root / 'optuna.db'}"
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.artifacts = root / "mlartifacts"

    def study(self, name: str, spec: dict, kind: str, swept: list[str]) -> tuple[optuna.Study, str, str]:
        exp = self.client.create_experiment(name, artifact_location=(self.artifacts / name).as_uri())
        parent = self.client.create_run(exp, run_name=name, tags={"masklab.role": "study", "masklab.study": name})
        obj = spec["objective"]
        study = optuna.create_study(study_name=name, storage=self.storage_url, direction=obj["direction"])
        for key, value in {
            "spec": spec, "kind": kind, "objective": obj["metric"], "direction": obj["direction"],
            "mlflow_parent_run_id": parent.info.run_id, "tracking_uri": self.tracking_uri, "swept": swept,
        }.items():
            study.set_user_attr(f"masklab.{key}", value)
        return study, exp, parent.info.run_id

    def trial(self, study, exp, parent, params, state, *, value=None, metrics=None, ablation=None,
              csv=True, failure=None, intermediate=None, attrs=None, run=True, distributions=None):
        """One trial and (when ``run``) its MLflow child run, as the runner records them."""
        from mlflow.entities import Metric, Param, RunTag

        number = len(study.get_trials(deepcopy=False))
        user_attrs = {"masklab.config_hash": f"h{number}", **(attrs or {})}
        if failure:
            user_attrs["masklab.failure"] = failure
        if run:
            tags = {"mlflow.parentRunId": parent, "masklab.role": "trial", "masklab.study": study.study_name,
                    "masklab.trial": str(number)}
            r = self.client.create_run(exp, tags=tags)
            run_id = r.info.run_id
            user_attrs["masklab.mlflow_run_id"] = run_id
            config = {"model.depth": DEPTH, **params}  # the flattened run config (fixed + swept)
            flat = {**config, "model.parameters": 1000 * config["model.depth"], "seed": params.get("seed", 0)}
            points = [Metric(k, v, 0, s) for k, series in (metrics or {}).items() for s, v in series]
            if ablation is not None:
                points += _ablation_points(ablation)
            self.client.log_batch(run_id, metrics=points, params=[Param(k, str(v)) for k, v in flat.items()])
            if ablation is not None and csv:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "ablation.csv"
                    ablation.to_csv(path, index=False)
                    self.client.log_artifact(run_id, str(path))
            if failure:
                self.client.log_batch(run_id, tags=[RunTag("masklab.failure", failure)])
            status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}.get(state)
            if status:
                self.client.set_terminated(run_id, status)
        dists = {k: (distributions or DISTRIBUTIONS)[k] for k in params}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, value=value, state=getattr(optuna.trial.TrialState, state),
            user_attrs=user_attrs, intermediate_values=intermediate or {}))
        return number


def _ablation_points(table: pd.DataFrame):
    """The same series studies/train.py logs next to the CSV (kept local: no torch here)."""
    from mlflow.entities import Metric

    out = []
    for row in table.itertuples(index=False):
        if row.variant == "truncate":
            out.append(Metric(f"ablation/{row.metric}", row.value, 0, int(row.removed)))
        elif row.variant == "drop_one":
            out.append(Metric(f"ablation/drop_one/{row.metric}", row.value, 0, int(row.block)))
        elif row.variant == "block_influence":
            out.append(Metric("ablation/block_influence", row.value, 0, int(row.block)))
        elif row.variant == "angular_distance" and row.removed == 1:
            out.append(Metric("ablation/angular_distance", row.value, 0, int(row.block)))
    return out


def ablation_table(finals: dict[str, float], depth: int) -> pd.DataFrame:
    """A layer-removal table in the lit_modules/ablation format: loss grows by 1 per block removed."""
    rows = []
    for metric, final in finals.items():
        for k in range(depth + 1):
            rows.append(("truncate", k, None, metric, final + k))
        for b in range(depth):
            rows.append(("drop_one", 1, b, metric, final + 0.5 + b))
    for b in range(depth):
        rows.append(("block_influence", None, b, "block_influence", 0.1 * (b + 1)))
        for n in range(1, depth - b + 1):
            rows.append(("angular_distance", n, b, "angular_distance", 0.05 * n + 0.01 * b))
    df = pd.DataFrame(rows, columns=["variant", "removed", "block", "metric", "value"])
    return df.astype({"removed": "Int64", "block": "Int64"})


def _curve(final: float, steps=(0, 10, 20)):
    return [(s, final + (len(steps) - 1 - i) * 0.5) for i, s in enumerate(steps)]


def build_grid(stores: Stores) -> None:
    spec = {"name": GRID, "model": {"name": "gpt"}, "data": {"name": "wikitext-2"}, "fixed": {"model.depth": DEPTH},
            "grid": {"masking.p_bw": [0.0, 0.5]}, "replicates": REPLICATES,
            "objective": {"metric": "val/fw_loss", "direction": "minimize"}}
    study, exp, parent = stores.study(GRID, spec, "grid", ["masking.p_bw"])
    for (p_bw, seed), (fw, bw) in GRID_RESULTS.items():
        metrics = {"val/fw_loss": _curve(fw), "val/bw_loss": _curve(bw), "train/fw_loss": _curve(fw - 0.2),
                   "val/fw_acc": [(20, 0.3)], "val/bw_acc": [(20, 0.2)],
                   # A window, then the run's figure at the final step (lit_modules/perf.py).
                   "perf/samples_per_s": [(10, 50.0), (20, 100.0 + 10 * seed)], "perf/mfu": [(20, 0.02)],
                   "perf/tokens_per_s": [(20, 3200.0 + 320 * seed)], "perf/data_wait": [(20, 0.05)]}
        abl = ablation_table({"fw_loss": fw, "bw_loss": bw}, DEPTH)
        stores.trial(study, exp, parent, {"masking.p_bw": p_bw, "seed": seed}, "COMPLETE", value=fw,
                     metrics=metrics, ablation=abl, csv=(p_bw, seed) != (0.0, 1),  # one run lost its CSV
                     intermediate={0: fw + 1.0, 1: fw + 0.5, 2: fw},
                     attrs={"masklab.grid_key": f"p_bw={p_bw}", "masklab.replicate": seed})
    stores.trial(study, exp, parent, {"masking.p_bw": 0.5, "seed": 2}, "FAIL",
                 failure="NonFiniteLossError: train/loss = nan at step 7",
                 metrics={"train/fw_loss": [(0, 9.0)]},
                 attrs={"masklab.grid_key": "p_bw=0.5", "masklab.replicate": 2})


def build_search(stores: Stores) -> None:
    spec = {"name": SEARCH, "model": {"name": "bert"}, "data": {"name": "wikitext-2"},
            "search": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.width": [32, 64]},
            "objective": {"metric": "val/mlm_loss", "direction": "minimize"}}
    study, exp, parent = stores.study(SEARCH, spec, "search", ["model.width", "optim.lr"])
    points = [(1e-3, 32, 4.0), (3e-3, 64, 3.5), (1e-2, 32, 3.8), (2e-4, 64, 3.6)]
    for lr, width, loss in points:
        metrics = {"val/mlm_loss": _curve(loss), "val/mlm_acc": [(20, 0.4)], "train/mlm_loss": _curve(loss)}
        abl = ablation_table({"mlm_loss": loss}, DEPTH)
        stores.trial(study, exp, parent, {"optim.lr": lr, "model.width": width}, "COMPLETE", value=loss,
                     metrics=metrics, ablation=abl, intermediate={0: loss + 1, 1: loss + 0.5, 2: loss})
    stores.trial(study, exp, parent, {"optim.lr": 5e-3, "model.width": 64}, "PRUNED",
                 failure="pruned at validation 1: val/mlm_loss 7.1", metrics={"val/mlm_loss": [(0, 7.5), (10, 7.1)]},
                 intermediate={0: 7.5, 1: 7.1})
    stores.trial(study, exp, parent, {"optim.lr": 4e-3, "model.width": 32}, "RUNNING", run=False)


def build_empty(stores: Stores) -> None:
    spec = {"name": EMPTY, "grid": {"model.depth": [2, 4]}, "replicates": 2,
            "objective": {"metric": "val/fw_loss", "direction": "minimize"}}
    study, exp, parent = stores.study(EMPTY, spec, "grid", ["model.depth"])
    stores.trial(study, exp, parent, {"model.depth": 2, "seed": 0}, "FAIL", failure="CUDA out of memory",
                 attrs={"masklab.grid_key": "depth=2", "masklab.replicate": 0})
    stores.trial(study, exp, parent, {"model.depth": 4, "seed": 0}, "RUNNING", run=False)
    study.enqueue_trial({"model.depth": 2, "seed": 1},
                        user_attrs={"masklab.grid_key": "depth=2", "masklab.replicate": 1})  # WAITING


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    # MLflow's sqlite schema migrations fsync dozens of times: ~8 s on this disk, ~0.8 s
    # in RAM. Use a RAM-backed temporary directory where the machine has one.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="masklab-reports-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("stores")
    s = Stores(root)
    build_grid(s)
    build_search(s)
    build_empty(s)
    yield s
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def grid(stores):
    return load_study(GRID, stores.storage_url, stores.tracking_uri)


@pytest.fixture(scope="module")
def search(stores):
    return load_study(SEARCH, stores.storage_url)  # tracking URI from the study's attributes


# ------------------------------------------------------------------ loader
def test_list_studies(stores):
    assert list_studies(stores.storage_url) == sorted([GRID, SEARCH, EMPTY])


def test_missing_study_is_one_line_naming_study_storage_and_what_is_there(stores, tmp_path):
    with pytest.raises(StudyNotFoundError) as e:
        load_study("no_such_study", stores.storage_url, stores.tracking_uri)
    msg = str(e.value)
    assert "\n" not in msg and "no_such_study" in msg and stores.storage_url in msg
    assert all(name in msg for name in (GRID, SEARCH, EMPTY))
    missing = tmp_path / "absent.db"
    with pytest.raises(StudyNotFoundError, match="absent.db"):
        load_study(GRID, f"sqlite:///{missing}")
    assert not missing.exists()  # reading never creates a store


def test_trials_frame(grid):
    t = grid.trials
    assert grid.kind == "grid" and grid.objective == "val/fw_loss" and grid.swept == ["masking.p_bw"]
    assert list(t["number"]) == [0, 1, 2, 3, 4]
    for col in ["number", "state", "value", "duration_s", "start", "setting", "seed", "run_id", "run_status",
                "failure", "masking.p_bw", "val/fw_loss", "val/bw_loss", "val/fw_acc", "model.parameters"]:
        assert col in t.columns, col
    assert list(t["state"]) == ["COMPLETE"] * 4 + ["FAIL"]
    assert list(t["setting"]) == ["p_bw=0", "p_bw=0", "p_bw=0.5", "p_bw=0.5", "p_bw=0.5"]
    assert list(t["seed"]) == [0, 1, 0, 1, 2]
    assert list(t["run_status"]) == ["FINISHED"] * 4 + ["FAILED"]
    assert t["failure"].iloc[4].startswith("NonFiniteLossError")
    assert t["val/fw_loss"].iloc[:4].tolist() == [3.0, 3.2, 3.1, 3.3]  # the last logged value
    assert t["model.parameters"].iloc[0] == 1000 * DEPTH
    assert grid.settings == ["p_bw=0", "p_bw=0.5"] and grid.expected_replicates == REPLICATES


def test_ablation_frame_from_artifacts_and_fallback(grid):
    a = grid.ablation
    assert list(a.columns) == ["number", "setting", "seed", "masking.p_bw", "variant", "removed", "block",
                               "metric", "value", "source"]
    assert str(a["removed"].dtype) == "Int64" and str(a["block"].dtype) == "Int64"
    assert set(a["number"]) == {0, 1, 2, 3}  # the FAIL trial has none
    # 2 metrics x (3 truncations + 2 drop-one) + 2 BI + 3 angular distances per CSV
    assert (a[a["number"] == 0]["source"] == "artifact").all() and (a["number"] == 0).sum() == 15
    # trial 1 lost its CSV: rebuilt from ablation/* metrics (angular distance for span 1 only)
    lost = a[a["number"] == 1]
    assert (lost["source"] == "metrics").all() and len(lost) == 14
    fw, bw = GRID_RESULTS[(0.0, 1)]
    trunc = lost[(lost["variant"] == "truncate")].pivot(index="removed", columns="metric", values="value")
    assert trunc["fw_loss"].tolist() == [fw, fw + 1, fw + 2] and trunc["bw_loss"].tolist() == [bw, bw + 1, bw + 2]
    bi = lost[lost["variant"] == "block_influence"]
    assert bi["block"].tolist() == [0, 1] and bi["removed"].isna().all()
    assert any("ablation.csv missing for trial(s) 1" in n for n in grid.notes)


def test_curves_and_intermediate(grid, search):
    c = grid.curves
    assert list(c.columns) == ["number", "metric", "step", "value"]
    v = c[(c["number"] == 0) & (c["metric"] == "val/fw_loss")]
    assert v["step"].tolist() == [0, 10, 20] and v["value"].tolist() == [4.0, 3.5, 3.0]
    assert set(c["metric"]) == {"val/fw_loss", "val/bw_loss", "train/fw_loss", "val/fw_acc", "val/bw_acc"}
    assert list(grid.intermediate.columns) == ["number", "step", "value"]
    assert len(grid.intermediate) == 4 * 3
    pruned = search.intermediate[search.intermediate["number"] == 4]
    assert pruned["value"].tolist() == [7.5, 7.1]


def test_mlflow_is_read_in_few_calls(stores, monkeypatch):
    """One search_runs for the children; on sqlite no per-run metric-history calls at all,
    and without the bulk query one call per run and key, with the same result."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    calls = {"search_runs": 0, "get_metric_history": 0}
    for name in calls:
        real = getattr(MlflowClient, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(MlflowClient, name, counted)
    bulk = load_study(GRID, stores.storage_url, stores.tracking_uri)
    assert calls == {"search_runs": 1, "get_metric_history": 0}
    monkeypatch.delattr(SqlAlchemyStore, "get_metric_history_bulk")
    slow = load_study(GRID, stores.storage_url, stores.tracking_uri)
    # curves: 5 keys x 4 complete runs + 1 key for the failed one; ablation of trial 1: 6 keys
    assert calls["get_metric_history"] == 5 * 4 + 1 + 6
    pd.testing.assert_frame_equal(bulk.curves, slow.curves)
    pd.testing.assert_frame_equal(bulk.ablation, slow.ablation)


def test_missing_tracking_store_still_loads(stores, tmp_path):
    data = load_study(GRID, stores.storage_url, f"sqlite:///{tmp_path / 'gone.db'}")
    assert len(data.trials) == 5 and data.ablation.empty and data.curves.empty
    assert any("does not exist" in n for n in data.notes)
    # the objective falls back to the Optuna value
    assert data.trials["val/fw_loss"].iloc[:4].tolist() == [3.0, 3.2, 3.1, 3.3]
    md, html = write_report(data, tmp_path / "report")
    assert "3.1000 ± 0.1414 (n=2)" in md.read_text()


# ------------------------------------------------------------------ tables and warnings
def test_summary_table_mean_std_n(grid):
    s = summary_table(grid)
    assert s["setting"].tolist() == ["p_bw=0", "p_bw=0.5"]
    assert s["n"].tolist() == [2, 2] and s["expected"].tolist() == [REPLICATES] * 2
    assert s["val/fw_loss mean"].tolist() == pytest.approx([3.1, 3.2])
    assert s["val/fw_loss std"].tolist() == pytest.approx([math.sqrt(0.02)] * 2)
    assert s["val/bw_loss mean"].tolist() == pytest.approx([5.1, 2.95])
    assert s["val/bw_loss std"].tolist() == pytest.approx([math.sqrt(0.02), math.sqrt(0.005)])
    assert s["model.parameters"].tolist() == [1000 * DEPTH] * 2


def test_effects_paired_by_seed(grid):
    """p_bw = 0.5 against the baseline 0, paired over seeds 0 and 1: fw differences
    (0.1, 0.1), bw differences (-2.1, -2.2); t(0.975, 1) = 12.706."""
    e = findings_frame(grid).set_index("metric")
    fw, bw = e.loc["val/fw_loss"], e.loc["val/bw_loss"]
    assert (fw["factor"], fw["level"], fw["baseline"], fw["held"], fw["n"]) == ("masking.p_bw", "0.5", "0", "", 2)
    assert fw["mean_diff"] == pytest.approx(0.1) and fw["ci_low"] == pytest.approx(0.1) and fw["resolved"]
    assert bw["mean_diff"] == pytest.approx(-2.15) and bw["rel_diff"] == pytest.approx(-2.15 / 5.1)
    half = 12.7062047 * math.sqrt(0.005) / math.sqrt(2)
    assert (bw["ci_low"], bw["ci_high"]) == pytest.approx((-2.15 - half, -2.15 + half), rel=1e-6)
    assert bw["resolved"] and bw["p"] == pytest.approx(1 - 2 * math.atan(43) / math.pi, rel=1e-6)  # t = 43, df 1


def test_report_opens_with_findings_and_writes_them(grid, tmp_path):
    md, _ = write_report(grid, tmp_path / "r")
    text = md.read_text()
    assert text.index("## Findings") < text.index("## Warnings")
    assert "masking.p_bw = 0.5 instead of 0 lowers val/bw_loss by 42.2%" in text
    table = pd.read_csv(tmp_path / "r" / "findings.csv")
    assert list(table.columns) == ["metric", "factor", "level", "baseline", "held", "n", "mean_diff", "rel_diff",
                                   "ci_low", "ci_high", "p", "p_holm", "resolved", "mde", "n_needed"]
    assert (tmp_path / "r" / "findings.json").exists()


def test_warnings_fire(grid, search):
    found = build_report(grid).findings
    kinds = [f.kind for f in found]
    leak = [f.message for f in found if f.kind == "leakage"]
    assert len(leak) == 1 and leak[0].startswith("p_bw=0.5:")  # bw < fw only there
    assert "resolution" not in kinds  # rank neighbours are no longer compared; Findings compare levels
    assert sorted(f.message for f in found if f.kind == "replicates") == [
        "p_bw=0.5: 2 of 3 replicates complete", "p_bw=0: 2 of 3 replicates complete"]
    assert [f.message for f in found if f.kind == "missing"] == [
        "1 of 6 grid trials (2 settings x 3 replicates) are not in the study: p_bw=0 replicate(s) 2"]
    trials = [f.message for f in found if f.kind == "trials"]
    assert trials == ["trial 4 (p_bw=0.5, seed 2) FAIL: NonFiniteLossError: train/loss = nan at step 7"]
    assert kinds.index("leakage") < kinds.index("trials")
    s = [f for f in build_report(search).findings]
    assert {f.kind for f in s} == {"trials"}  # no fw/bw metrics, no replicates in a search
    assert any("PRUNED: pruned at validation 1" in f.message for f in s)
    assert any("trial 5" in f.message and "RUNNING" in f.message for f in s)


def test_failed_trial_rerun_is_named_and_not_counted_missing(grid):
    from reports.checks import missing_trials, problem_trials

    extra = grid.trials.iloc[[4]].assign(number=5, seed=0, replicate=0, setting="p_bw=0", failure="worker lost")
    extra["masking.p_bw"] = 0.0
    data = dataclasses.replace(grid, trials=pd.concat([grid.trials, extra], ignore_index=True))
    msgs = [f.message for f in problem_trials(data)]
    assert "trial 5 (p_bw=0, seed 0) FAIL: worker lost (re-run as trial 0, COMPLETE)" in msgs
    assert [f.message for f in missing_trials(data)] == [f.message for f in missing_trials(grid)]


# ------------------------------------------------------------------ report files
def _scripts(html: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", html)


def test_grid_report_files(grid, tmp_path):
    md_path, html_path = write_report(grid, tmp_path / "grid")
    md, html = md_path.read_text(), html_path.read_text()
    assert md_path.name == "report.md" and html_path.name == "report.html"
    assert "| p_bw=0 | 3.1000 ± 0.1414 (n=2) | 5.1000 ± 0.1414 (n=2) |" in md
    assert "| p_bw=0.5 | 3.2000 ± 0.1414 (n=2) | 2.9500 ± 0.0707 (n=2) |" in md
    assert "2/3" in md and "2,000" in md
    # Throughput in the per-setting table: the run's figure (the last point), mean ± std over seeds 0 and 1.
    assert "## Final validation metrics per setting and throughput" in md and "perf/samples_per_s" in md
    assert "| 105.0 ± 7.1 (n=2) | 3360.0 ± 226.3 (n=2) | 0.0200 ± 0.0000 (n=2) |" in md
    assert "(report.html#layer-removal)" in md and "## Warnings" in md and "**leakage**" in md
    assert "## Layer removal: loss added by removing each block from the back" in md  # numbers in the Markdown
    assert "| val/bw_loss | masking.p_bw = 0.5 vs 0 | — | 2 | -2.15 [-2.785, -1.515] | -42.2% [-54.6, -29.7] |" in md
    assert GRID in md and grid.storage_url in md and grid.tracking_uri in md and "4 COMPLETE, 1 FAIL" in md
    # self-contained: plotly.js inline exactly once, no external script
    assert html.count("* plotly.js v") == 1
    assert not [s for s in _scripts(html) if "src=" in s]
    assert not re.search(r"src=[\"']?https?:", html)
    assert html.count("Plotly.newPlot") >= 3
    for anchor in ("findings", "forest", "effects", "layer-removal", "block-heatmaps", "validation-curves", "summary",
                   "warnings"):
        assert f"id='{anchor}'" in html or f'id="{anchor}"' in html, anchor
    assert "p_bw=0.5: val/bw_loss 2.9500 &lt; val/fw_loss 3.2000" in html


def test_search_report(search, tmp_path):
    md_path, html_path = write_report(search, tmp_path / "search")
    md, html = md_path.read_text(), html_path.read_text()
    assert search.kind == "search" and search.objective == "val/mlm_loss"
    assert "Best complete trials" in md and "| 1 | 3.5000 | 64 | 0.003 |" in md
    assert "Parameter importances (fANOVA)" in md and "optim.lr" in md
    assert "4 COMPLETE, 1 PRUNED, 1 RUNNING" in md
    assert html.count("* plotly.js v") == 1 and not [s for s in _scripts(html) if "src=" in s]
    for anchor in ("optimization-history", "importance-plot", "parallel-coordinates", "intermediate-values",
                   "layer-removal"):
        assert f"id='{anchor}'" in html, anchor
    assert '"parcoords"' in html and "mlm_loss" in html
    # importances need 2 complete trials: with one, the report says so instead of failing
    one = dataclasses.replace(search, trials=search.trials[search.trials["number"].isin([0, 4, 5])])
    md_one = write_report(one, tmp_path / "one")[0].read_text()
    assert "needs at least 2 complete trials (have 1)" in md_one


def test_zero_complete_trials_renders_a_clear_message(stores, tmp_path):
    data = load_study(EMPTY, stores.storage_url)
    md_path, html_path = write_report(data, tmp_path / "empty")
    md, html = md_path.read_text(), html_path.read_text()
    assert "No trial has completed yet (1 FAIL, 1 RUNNING, 1 WAITING)" in md and "No trial has completed yet" in html
    assert "CUDA out of memory" in md
    assert data.trials["setting"].tolist() == ["depth=2", "depth=4", "depth=2"]  # WAITING: enqueued values
    assert "depth=4 replicate(s) 1" in md and "trial 2 (depth=2, seed 1) WAITING" in md
    assert "plotly.js" not in html  # nothing to plot: no bundle either


STATUS_SCRIPT = """
import sys, optuna
from reports.loader import load_study
from reports.study_report import write_report
path = sys.argv[1]
storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
study = optuna.create_study(study_name="j", storage=storage)
study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"masklab.failure": "boom"}))
data = load_study("j", "journal:" + path, with_mlflow=False)
assert data.trials["failure"].tolist() == ["boom"], data.trials
assert "mlflow" not in sys.modules
print("ok")
"""


def test_reports_import_no_torch_lightning_or_mlflow(tmp_path):
    """``import reports.loader, reports.study_report`` pulls in none of torch, Lightning
    or MLflow, and of lit_modules only its torch-free config (the one ``flatten``) and
    transfer task names (chance levels); an
    Optuna-only load (journal storage) keeps MLflow out too."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", STATUS_SCRIPT, str(tmp_path / "j.log")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    full = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    mods = {m.split(".")[0] for m in full}
    assert not mods & {"torch", "lightning", "pytorch_lightning", "mlflow"}
    assert {m for m in full if m.split(".")[0] == "lit_modules"} <= {
        "lit_modules", "lit_modules.config", "lit_modules.config_errors", "lit_modules.transfer",
        "lit_modules.transfer.names"}


def test_study_without_trials_and_missing_journal(tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    with pytest.raises(StudyNotFoundError, match="does not exist"):
        load_study("x", f"journal:{tmp_path / 'absent.log'}")
    path = tmp_path / "studies.log"
    optuna.create_study(study_name="fresh", storage=JournalStorage(JournalFileBackend(str(path))))
    data = load_study("fresh", str(path))
    assert data.trials.empty and data.kind == "unknown"
    md, html = write_report(data, tmp_path / "fresh")
    assert "No trial has completed yet (no trials at all)" in md.read_text()

