"""Studies end to end: grid resume, failures, pruning, dead workers, malformed specs."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from scipy import stats

from lit_modules.config_errors import ConfigError
from lit_modules.paths import Workspace
from studies.spec import load_spec

from .conftest import REPO, TINY

FIXED = {k: v for k, v in copy.deepcopy(TINY["gpt"]).items()}
FIXED["trainer"].update(max_steps=4, val_every=2)


def spec_dict(**changes) -> dict:
    d = {
        "name": "tiny_grid", "model": "gpt", "data": "wikitext-2", "fixed": copy.deepcopy(FIXED),
        "grid": {"masking.p_bw": [0.0, 0.5]}, "replicates": 2,
        "objective": {"metric": "val/fw_loss", "direction": "minimize"},
        "ablation": {"drop_one": False},
    }
    d.update(changes)
    return d


def stores(ws: Workspace) -> tuple[str, str]:
    return f"sqlite:///{ws.output_dir / 'optuna.db'}", ws.tracking_uri


def run(spec, ws, report=False, **kw):
    from studies.runner import run_study

    storage, tracking = stores(ws)
    return run_study(spec, ws, storage, tracking, progress=False, report=report, log=lambda m: None, **kw)


def trials(ws, name):
    return optuna.load_study(study_name=name, storage=stores(ws)[0]).get_trials()


@pytest.fixture
def ws(tmp_path, data_dir, session_cache):
    ws = Workspace.resolve(tmp_path / "out", data_dir)
    # Share the session's tokenizer cache (keyed by corpus and options) so each
    # tokenizer trains once per test session.
    ws.output_dir.mkdir(parents=True)
    (session_cache / "cache").mkdir(exist_ok=True)
    (ws.output_dir / "cache").symlink_to(session_cache / "cache", target_is_directory=True)
    return ws


# ---------------------------------------------------------------- grid end to end


def test_grid_study_end_to_end_and_resume(ws):
    from mlflow.tracking import MlflowClient

    spec = load_spec(spec_dict())
    result = run(spec, ws, report=True)
    assert result.counts == {"COMPLETE": 4} and result.ran == 4
    ts = trials(ws, "tiny_grid")
    points = sorted((t.params["masking.p_bw"], t.params["seed"]) for t in ts)
    assert points == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]

    client = MlflowClient(tracking_uri=stores(ws)[1])
    exp = client.get_experiment_by_name("tiny_grid")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("masklab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("masklab.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in children)
    by_trial = {int(r.data.tags["masklab.trial"]): r for r in children}
    for t in ts:  # each store finds the other
        run_ = by_trial[t.number]
        assert t.user_attrs["masklab.mlflow_run_id"] == run_.info.run_id
        assert run_.data.tags["masklab.study"] == "tiny_grid"
        assert run_.data.params["masking.p_bw"] == str(t.params["masking.p_bw"])
        assert t.value == pytest.approx(run_.data.metrics["val/fw_loss"])
        assert len(t.intermediate_values) == 2  # one per validation
    # replicate seeds differ, the same seed gives the same data: losses differ by seed
    assert len({round(t.value, 6) for t in ts}) == 4

    # the report: a table row per setting with n = 2, attached to the parent run
    md = result.report_md.read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| p_bw=")]
    assert len(rows) == 2 and all("(n=2)" in r for r in rows), rows
    # the header says what was trained on and what every trial was scored on
    assert re.search(r"\*\*data\*\*: trained on wiki.valid.raw \([\d,]+ tokens\); validated on wiki.test.raw "
                     r"\(8 windows x 32 tokens = 256 tokens\); WikiText-2's train split is not available", md), md[:2000]
    # findings.csv equals a recomputation from the MLflow runs: p_bw 0.5 vs 0, paired by seed
    findings = pd.read_csv(result.report_md.parent / "findings.csv")
    final = {(float(r.data.params["masking.p_bw"]), int(r.data.params["seed"])): r.data.metrics["val/fw_loss"]
             for r in children}
    diffs = np.array([final[(0.5, s)] - final[(0.0, s)] for s in (0, 1)])
    half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / np.sqrt(2)
    row = findings[(findings.metric == "val/fw_loss") & (findings.factor == "masking.p_bw")].iloc[0]
    assert (row["level"], row["baseline"], row["n"]) == (0.5, 0.0, 2)
    assert [row["mean_diff"], row["ci_low"], row["ci_high"]] == pytest.approx(
        [diffs.mean(), diffs.mean() - half, diffs.mean() + half], rel=1e-9)
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/findings.csv", "report/findings.json"}
    html = result.report_html.read_text()
    assert html.count("<script") >= 2 and "src=\"http" not in html
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.md", "report/report.html"}
    from reports.loader import load_study

    data = load_study("tiny_grid", *stores(ws))
    per_setting = data.trials[data.trials.state == "COMPLETE"].groupby("setting").size()
    assert len(per_setting) == 2 and set(per_setting) == {2}

    # running again adds no trial and re-runs nothing
    again = run(spec, ws)
    assert again.ran == 0 and again.counts == {"COMPLETE": 4}
    assert len(trials(ws, "tiny_grid")) == 4
    assert len(client.search_runs([exp.experiment_id])) == 5


def test_changed_fixed_config_is_refused(ws):
    spec = load_spec(spec_dict(grid={"masking.p_bw": [0.0]}, replicates=1))
    run(spec, ws)
    other = load_spec(spec_dict(grid={"masking.p_bw": [0.0]}, replicates=1), ["trainer.max_steps=6"])
    with pytest.raises(ConfigError) as info:
        run(other, ws)
    msg = str(info.value)
    assert "\n" not in msg and "trainer.max_steps 4 -> 6" in msg and "hash" not in msg, msg
    assert [t.state for t in trials(ws, "tiny_grid")] == [TrialState.COMPLETE]


# ---------------------------------------------------------------- failures and pruning


def test_diverging_trials_fail_with_reason_and_the_study_goes_on(ws):
    from mlflow.tracking import MlflowClient

    spec = load_spec(spec_dict(name="diverge", grid={"optim.lr": [3e-3, 1e30]}, replicates=1))
    result = run(spec, ws)
    assert result.counts == {"COMPLETE": 1, "FAIL": 1}
    failed = [t for t in trials(ws, "diverge") if t.state == TrialState.FAIL][0]
    reason = failed.user_attrs["masklab.failure"]
    assert "NonFiniteLossError" in reason and "train/loss" in reason
    run_ = MlflowClient(tracking_uri=stores(ws)[1]).get_run(failed.user_attrs["masklab.mlflow_run_id"])
    assert run_.info.status == "FAILED" and "NonFiniteLossError" in run_.data.tags["masklab.failure"]
    # a FAILed grid point is run again on the next invocation (and fails again)
    assert run(spec, ws).ran == 1


def test_median_pruner_prunes_a_trial_that_cannot_learn(ws):
    """Trial 0 learns (lr 1e-2); trial 1 has lr 1e-9 and the same data and init, so its
    loss at the first validation is above trial 0's: the median pruner must stop it."""
    search = {
        "name": "prune", "model": "gpt", "data": "wikitext-2", "fixed": copy.deepcopy(FIXED),
        "search": {"optim.lr": {"type": "float", "low": 1e-9, "high": 1e-2, "log": True}},
        "n_trials": 2, "sampler": "random", "pruner": {"name": "median", "n_startup_trials": 1},
        "objective": "val/fw_loss", "ablation": {"drop_one": False},
    }
    search["fixed"]["optim"] = {"warmup_steps": 0}
    search["fixed"]["trainer"].update(max_steps=6, val_every=2)
    spec = load_spec(search)
    from studies.runner import open_study

    study = open_study(spec, *stores(ws))
    study.enqueue_trial({"optim.lr": 1e-2})
    study.enqueue_trial({"optim.lr": 1e-9})
    result = run(spec, ws)
    assert result.counts == {"COMPLETE": 1, "PRUNED": 1}
    pruned = [t for t in trials(ws, "prune") if t.state == TrialState.PRUNED][0]
    assert pruned.params["optim.lr"] == 1e-9 and "pruned" in pruned.user_attrs["masklab.failure"]
    assert len(pruned.intermediate_values) == 1


# ---------------------------------------------------------------- dead workers, Ctrl-C


def _start_worker(spec_path, ws, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "studies.cli", "run", str(spec_path), "--no-progress", "--no-report",
           "--output-dir", str(ws.output_dir), "--data-dir", str(ws.data_dir), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_running(ws, name, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited early:\n{proc.stdout.read()}")
        try:
            ts = trials(ws, name)
        except KeyError:
            ts = []
        if any(t.state == TrialState.RUNNING and "masklab.mlflow_run_id" in t.user_attrs for t in ts):
            return
        time.sleep(0.3)
    pytest.fail("no trial started")


def _slow_spec(tmp_path, name, steps: int = 200):
    import yaml

    d = spec_dict(name=name, grid={"masking.p_bw": [0.0, 0.5]}, replicates=1)
    d["fixed"]["trainer"].update(max_steps=steps, val_every=steps // 2)  # long enough to be caught mid-trial
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, d


def test_killed_worker_trial_is_failed_and_rerun(ws, tmp_path):
    path, d = _slow_spec(tmp_path, "killed")
    proc = _start_worker(path, ws)
    try:
        _wait_running(ws, "killed", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    [zombie] = [t for t in trials(ws, "killed") if t.state == TrialState.RUNNING]
    # the next run marks the dead trial FAIL and runs its grid point again
    fast_run = run(load_spec(path), ws)
    ts = trials(ws, "killed")
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    dead = next(t for t in ts if t.number == zombie.number)
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["masklab.failure"]
    complete = sorted(t.params["masking.p_bw"] for t in ts if t.state == TrialState.COMPLETE)
    assert complete == [0.0, 0.5] and fast_run.counts["COMPLETE"] == 2


def test_ctrl_c_marks_the_running_trial_failed(ws, tmp_path):
    path, _ = _slow_spec(tmp_path, "interrupted", steps=20_000)  # interrupted long before it could end
    proc = _start_worker(path, ws)
    try:
        _wait_running(ws, "interrupted", proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    ts = trials(ws, "interrupted")
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "interrupted" in failed[0].user_attrs["masklab.failure"]


# ---------------------------------------------------------------- malformed specs

BAD_SPECS = [
    (dict(colour="red"), "colour"),
    (dict(model="gtp"), "model"),
    (dict(data="wikitext-3"), "data"),
    (dict(grid={}), "grid"),
    (dict(grid={"masking.p_bw": []}), "grid.masking.p_bw"),
    (dict(replicates=0), "replicates"),
    (dict(replicates="two"), "replicates"),
    (dict(grid={"model.depht": [2, 3]}), "grid.model.depht"),
    (dict(grid={"masking.p_bw": [0.0, 1.5]}), "masking.p_bw"),
    (dict(grid={"model.depth": "2, 4"}), "grid.model.depth"),
    (dict(objective={"metric": "val/fw_loss", "direction": "down"}), "objective.direction"),
    (dict(name=""), "name"),
    (dict(fixed={"masking": {"name": "nope"}}), "masking.name"),
    (dict(fixed=[1, 2]), "fixed"),
    (dict(grid=None, search={"optim.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, n_trials=3), "search.optim.lr.low"),
    (dict(grid=None, search={"optim.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, n_trials=3), "search.optim.lr.low"),
    (dict(grid=None, search={"optim.lr": {"type": "uniform", "low": 0, "high": 1}}, n_trials=3), "search.optim.lr.type"),
    (dict(grid=None, search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, n_trials=0), "n_trials"),
    (dict(grid=None, search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, n_trials=3, sampler="grid"), "sampler"),
    (dict(grid=None, search={"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, n_trials=3, pruner="sometimes"), "pruner.name"),
    (dict(grid=None, search={"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, n_trials=3), "search.optim.lrr"),
]


@pytest.mark.parametrize("changes,field", BAD_SPECS, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD_SPECS)])
def test_malformed_spec_one_line_error(changes, field, tmp_path):
    import yaml

    d = spec_dict()
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    if "search" in d:
        d.pop("replicates", None)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "\n" not in msg and field in msg and "bad.yaml" in msg, msg


def test_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert "\n" not in str(info.value) and "broken.yaml" in str(info.value)


def test_cli_bad_spec_exit_code(tmp_path, capsys):
    from studies.cli import main

    assert main(["run", "no_such_spec", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "SPEC" in err and "gpt_pbw_demo" in err


def test_status_and_report_do_not_import_torch(ws):
    """`masklab status` / `report` only read the stores: no torch, no Lightning."""
    spec = load_spec(spec_dict(name="light", grid={"masking.p_bw": [0.0]}, replicates=1))
    run(spec, ws)
    code = (
        "import sys; from studies.cli import main; "
        f"rc = main(['status', {str(REPO / 'studies/specs/gpt_pbw_demo.yaml')!r}, '--study-name', 'light', "
        f"'--output-dir', {str(ws.output_dir)!r}]); "
        f"rc |= main(['report', {str(REPO / 'studies/specs/gpt_pbw_demo.yaml')!r}, '--study-name', 'light', "
        f"'--output-dir', {str(ws.output_dir)!r}]); "
        "bad = [m for m in ('torch', 'lightning') if m in sys.modules]; "
        "print('IMPORTED', bad); sys.exit(rc or bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "COMPLETE" in out.stdout and "report.html" in out.stdout


def test_tiny_bert_study(ws):
    """The registry's second family runs as a study and its report is generic."""
    d = spec_dict(name="tiny_bert", model="bert", fixed=copy.deepcopy(TINY["bert"]),
                  grid={"masking.name": ["mlm-random", "mlm-span"]}, replicates=1,
                  objective={"metric": "val/mlm_loss", "direction": "minimize"})
    d["fixed"]["trainer"].update(max_steps=4, val_every=2)
    result = run(load_spec(d), ws, report=True)
    assert result.counts == {"COMPLETE": 2}
    md = result.report_md.read_text()
    assert "val/mlm_loss" in md and "val/mlm_acc" in md
    from reports.loader import load_study

    data = load_study("tiny_bert", *stores(ws))
    truncate = data.ablation[(data.ablation.variant == "truncate") & (data.ablation.metric == "mlm_loss")]
    assert sorted(truncate.removed.unique()) == [0, 1, 2] and truncate.number.nunique() == 2


def test_tiny_mae_study_with_gallery(ws):
    d = spec_dict(name="tiny_mae", model="mae", data="cifar10", fixed=copy.deepcopy(TINY["mae"]),
                  grid={"masking.mask_ratio": [0.5, 0.75]}, replicates=1,
                  objective={"metric": "val/recon_loss", "direction": "minimize"})
    d["fixed"]["trainer"].update(max_steps=4, val_every=2)
    result = run(load_spec(d), ws, report=True)
    assert result.counts == {"COMPLETE": 2}
    md, html = result.report_md.read_text(), result.report_html.read_text()
    assert "val/recon_loss" in md and "val/probe_acc" in md
    assert html.count("<img alt=") == 2  # one reconstruction per setting
    assert html.count("src='data:image/png;base64,") == 2


@pytest.mark.parametrize("model", ["video-mae", "maskvit"])
def test_tiny_video_study(ws, model):
    fixed = copy.deepcopy(TINY[model])
    grid = {"masking.name": ["video-tube", "video-random"]}
    if model == "maskvit":  # token clips (the session's synthetic ones)
        grid = {"masking.mask_ratio": [0.5, 0.75]}
    d = spec_dict(name=f"tiny_{model}", model=model, data=fixed["data"]["name"], fixed=fixed, grid=grid,
                  replicates=1, objective={"metric": "val/recon_loss", "direction": "minimize"})
    result = run(load_spec(d), ws, report=True)
    assert result.counts == {"COMPLETE": 2}
    from reports.loader import load_study

    data = load_study(f"tiny_{model}", *stores(ws))
    t = data.ablation[(data.ablation.variant == "truncate") & (data.ablation.metric == "recon_loss")]
    assert sorted(t.removed.unique()) == [0, 1, 2]


def test_grid_study_with_a_transfer_objective(ws):
    """A grid ranked by what its features are worth: every trial is probed on SST-2, the
    objective is the probe's accuracy, the findings state the effect of the swept factor
    (two recipes: BERT, ELECTRA with its generator's width) on it with a CI, and the
    report has the Transfer section with the baselines."""
    fixed = copy.deepcopy(TINY["bert"])
    fixed["trainer"].update(max_steps=6, val_every=3)
    fixed["transfer"] = {"tasks": ["sst2"], "max_train": 150, "max_select": 60, "max_eval": 120}
    d = spec_dict(name="tiny_transfer", model="bert", fixed=fixed, replicates=2,
                  objective={"metric": "transfer/sst2/probe_acc", "direction": "maximize"})
    del d["grid"]  # the factor is the recipe: BERT, or ELECTRA with its own keys
    d["recipes"] = {"bert": {"model.name": "bert"},
                     "electra": {"model.name": "electra", "model.generator_size": 0.5}}
    result = run(load_spec(d), ws, report=True)
    assert result.counts == {"COMPLETE": 4}
    values = [t.value for t in trials(ws, "tiny_transfer")]
    assert all(0.0 <= v <= 1.0 for v in values)
    findings = pd.read_csv(result.report_md.parent / "findings.csv")
    rows = findings[(findings.metric == "transfer/sst2/probe_acc") & (findings.factor == "recipe")]
    assert set(rows.level) == {"electra"} and set(rows.baseline) == {"bert"}
    assert len(rows) and (rows.n == 2).all() and rows[["ci_low", "ci_high"]].notna().all().all()
    assert not findings.metric.str.contains("baseline").any()
    md = result.report_md.read_text()
    assert "## Transfer" in md and "random init" in md and "TF-IDF" in md
    from reports.loader import load_study

    data = load_study("tiny_transfer", *stores(ws))
    assert (data.complete["train/flops"] > 0).all()  # every trial's compute, for the per-FLOP figure
    assert "Metrics against training compute" in result.report_html.read_text()


def test_recipes_are_the_levels_of_one_factor(tmp_path):
    """``recipes:`` set keys together (another family and its own keys); a bad recipe
    and ``--set`` of a key a recipe sets are one-line errors."""
    d = spec_dict(recipes={"fw": {"masking.p_bw": 0.0}, "fw+bw": {"masking.p_bw": 0.5, "model.depth": 1}})
    spec = load_spec(d)
    assert spec.swept == ["recipe", "masking.p_bw"] and spec.grid["recipe"] == ("fw", "fw+bw")
    cfg = spec.run_config_dict({"recipe": "fw+bw", "masking.p_bw": 0.0}, 0)
    assert cfg["model"]["depth"] == 1 and cfg["masking"]["p_bw"] == 0.0  # the grid's own key wins
    for changes, field in (({"recipes": {"a": {"model.depth": 1}}}, "recipes"),
                           ({"recipes": {"a": {"model.depth": 1}, "b": {"model.nope": 1}}}, "model.nope"),
                           ({"recipes": {"a": {"depth": 1}, "b": {"model.depth": 2}}}, "recipes.a.depth")):
        with pytest.raises(ConfigError) as e:
            load_spec(spec_dict(**changes))
        assert e.value.field == field and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_spec(d, overrides=["model.depth=3"])
    assert e.value.field == "--set model.depth" and "recipe fw+bw" in str(e.value)
