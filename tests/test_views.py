"""The MLflow and Optuna views read like the study: child runs named by their setting and
seed, the parent run by the study, layer-removal summaries as scalars, the Optuna metric
named, one terminal line per trial naming its setting, and ``masklab ui`` opening the
study's runs table (checked in headless Chromium against a real ``mlflow ui``)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from .conftest import REPO, TINY
from .servers import chromium_path, free_port, unavailable

NAME = "views_grid"
FIXED = copy.deepcopy(TINY["gpt"])
FIXED["trainer"].update(max_steps=2, val_every=2)
FIXED["masking"]["p_bw"] = 0.0
SPEC = {"name": NAME, "model": "gpt", "data": "wikitext-2", "fixed": FIXED,
        "grid": {"model.depth": [1, 2], "masking.p_bw": [0.0, 0.5]}, "replicates": 1,
        "objective": {"metric": "val/fw_loss", "direction": "minimize"}, "ablation": {"drop_one": False}}
SETTINGS = {"depth=1 p_bw=0 seed=0", "depth=1 p_bw=0.5 seed=0", "depth=2 p_bw=0 seed=0", "depth=2 p_bw=0.5 seed=0"}
LINK = re.compile(r"^mlflow ui: (http://127\.0\.0\.1:(\d+))/#/experiments/(\d+)\?workflowType=machine_learning$")


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir, session_cache):
    """``masklab run`` of a 2 x 2 grid (4 tiny trials) into a fresh output dir: the
    output dir, the spec file, and what the command printed (stdout, stderr)."""
    from studies.cli import main

    shm = Path("/dev/shm")  # MLflow's schema migrations fsync often: RAM where there is some
    root = Path(tempfile.mkdtemp(prefix="masklab-views-", dir=shm if os.access(shm, os.W_OK) else None))
    out = root / "out"
    out.mkdir()
    (session_cache / "cache").mkdir(exist_ok=True)  # tokenizers train once per session
    (out / "cache").symlink_to(session_cache / "cache", target_is_directory=True)
    spec = root / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["run", str(spec), "--output-dir", str(out), "--data-dir", str(data_dir), "--no-report",
                   "--no-progress"])
    assert rc == 0, stdout.getvalue() + stderr.getvalue()
    yield out, spec, stdout.getvalue(), stderr.getvalue()
    shutil.rmtree(root, ignore_errors=True)


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def _runs(out: Path):
    client = _client(out)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("masklab.role") == "study"]
    children = [r for r in runs if r.data.tags.get("masklab.role") == "trial"]
    return client, exp, parents, children


def test_child_runs_are_named_by_setting_and_seed(study):
    out, *_ = study
    client, exp, [parent], children = _runs(out)
    assert parent.info.run_name == NAME  # the parent run is the study
    assert sorted(r.info.run_name for r in children) == sorted(SETTINGS)
    for run in children:  # each name says what the run's params are
        p = run.data.params
        assert run.info.run_name == f"depth={p['model.depth']} p_bw={float(p['masking.p_bw']):g} seed={p['seed']}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the same names in Optuna, where each trial links to its run
    trials = optuna.load_study(study_name=NAME, storage=f"sqlite:///{out / 'optuna.db'}").trials
    names = {t.user_attrs["masklab.mlflow_run_id"]: t.user_attrs["masklab.name"] for t in trials}
    assert names == {r.info.run_id: r.info.run_name for r in children}


def test_experiment_made_before_the_tag_gets_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from studies.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "old", tmp_path) == old
    new = get_or_create_experiment(client, "new", tmp_path)
    for exp_id in (old, new):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_layer_removal_summaries_are_scalars_of_the_curve(study):
    out, *_ = study
    client, _, _, children = _runs(out)
    for run in children:
        depth = int(run.data.params["model.depth"])
        for metric in ("fw_loss", "bw_loss"):
            curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"ablation/{metric}")}
            assert sorted(curve) == list(range(depth + 1))
            for key, want in ((f"ablation_delta/{metric}_last_block", curve[1] - curve[0]),
                              (f"ablation_delta/{metric}_per_block", (curve[depth] - curve[0]) / depth)):
                history = client.get_metric_history(run.info.run_id, key)
                assert len(history) == 1, key  # one value: what the compare view shows is the summary
                assert run.data.metrics[key] == pytest.approx(want, rel=1e-6), key


def test_ablation_summary_of_a_tidy_table():
    from studies.train import ablation_summary

    rows = [("truncate", k, None, "fw_loss", 3.0 + k * k) for k in range(4)]  # +1, +4, +9 over 3 blocks
    rows += [("truncate", k, None, "fw_acc", 0.5 - 0.1 * k) for k in range(4)]
    rows += [("truncate", 0, None, "probe_acc", 0.2)]  # nothing removed: no summary
    rows += [("drop_one", 1, 0, "fw_loss", 99.0), ("truncate", 3, None, "bw_loss", float("nan"))]
    table = pd.DataFrame(rows, columns=["variant", "removed", "block", "metric", "value"])
    got = {k: v for k, v, step in ablation_summary(table)}
    assert got == pytest.approx({"ablation_delta/fw_loss_last_block": 1.0, "ablation_delta/fw_loss_per_block": 3.0,
                                 "ablation_delta/fw_acc_last_block": -0.1, "ablation_delta/fw_acc_per_block": -0.1})


def test_optuna_metric_is_named_in_the_study_and_in_optuna_dashboard(study):
    import json

    out, *_ = study
    storage = f"sqlite:///{out / 'optuna.db'}"
    assert optuna.load_study(study_name=NAME, storage=storage).metric_names == ["val/fw_loss"]
    binary = Path(sys.executable).parent / "optuna-dashboard"
    if not binary.exists():
        unavailable("optuna-dashboard", "pip install -e '.[dev]'")
    port = free_port()
    proc = subprocess.Popen([str(binary), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                    summaries = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        [study_id] = [s["study_id"] for s in summaries if s["study_name"] == NAME]
        with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=30) as r:
            assert json.load(r)["objective_names"] == ["val/fw_loss"]  # not "Objective 0"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def test_terminal_line_per_trial_names_setting_and_seed(study):
    out, spec, stdout, stderr = study
    lines = [ln for ln in stderr.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 4, stderr
    named = set()
    for line in lines:
        m = re.fullmatch(r"trial \d+ (depth=\d p_bw=[\d.]+ seed=0): complete val/fw_loss=\d+\.\d{4}", line)
        assert m, line
        named.add(m.group(1))
    assert named == SETTINGS
    # and the end of the run says how to browse the runs
    assert f"browse the runs: masklab ui {spec} --output-dir {out}" in stdout


# ------------------------------------------------------------------ masklab ui
def test_ui_refuses_bad_input_in_one_line_before_starting_anything(study, tmp_path, capsys):
    from studies.cli import main

    out, *_ = study
    cases = [(["ui", NAME, "--output-dir", str(tmp_path / "none")], "no such store"),
             (["ui", "no_such_study", "--output-dir", str(out)], f"experiments there: Default, {NAME}"),
             (["ui", "nowhere/spec.yaml", "--output-dir", str(out)], "no such file"),
             (["ui", NAME, "--output-dir", str(out), "--port", "70000"], "--port = 70000")]
    for argv, said in cases:
        start = time.monotonic()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("masklab: error:") and "\n" not in err and said in err, (argv, err)
        assert time.monotonic() - start < 5, argv  # no server was started for it
    assert not (tmp_path / "none").exists()  # reading never creates a store


# The run names in the runs table (ag-grid): the link in each row's run name cell.
RUN_NAME_CELLS = """[...document.querySelectorAll('.ag-row [col-id="attributes.`Run Name`"]')]"""
ROW_NAMES = f"{RUN_NAME_CELLS}.map(c => c.querySelector('a')).filter(a => a).map(a => a.innerText.trim())"
# Click the expander (the run name cell's button) of the parent run named %r.
EXPAND_PARENT = f"""(() => {{ const cell = {RUN_NAME_CELLS}.find(c => c.querySelector('a')?.innerText.trim() === %r);
  const b = cell && cell.querySelector("button"); if (b) b.click(); return !!b; }})()"""


@pytest.fixture(scope="module")
def browser():
    binary = chromium_path()
    if binary is None:
        unavailable("chromium", "apt-get install chromium")
    try:
        import websocket  # noqa: F401
    except ImportError:
        unavailable("websocket-client", "pip install -e '.[dev]'")
    from .test_dashboard import Browser

    b = Browser(binary)
    yield b
    b.close()


def test_masklab_ui_link_opens_the_study_runs_table(study, browser, capsys):
    """``masklab ui SPEC`` starts ``mlflow ui`` on the study's store and prints the link to
    its runs table; in Chromium the link opens the runs table (not the GenAI overview the
    experiment's bare address opens) with the study's parent run and, expanded, its
    child runs by name. Ctrl-C stops the server; the command imports nothing heavy."""
    from studies.cli import main

    out, spec, *_ = study
    code = ("import sys; from studies.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', [m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules], flush=True); "
            "sys.exit(rc)")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-c", code, "ui", str(spec), "--output-dir", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        line = proc.stdout.readline().rstrip("\n")
        m = LINK.match(line)
        assert m, line + proc.stderr.read()
        base, exp_id = m.group(1), m.group(3)
        client, exp, [parent], children = _runs(out)
        assert exp_id == exp.experiment_id
        # the bare experiment address opens the GenAI overview in a fresh browser ...
        browser.open(f"{base}/#/experiments/{exp_id}")
        browser.wait_for("location.hash.includes('/overview')", timeout=120)
        # ... the printed link, the runs table
        link = line.split(" ", 2)[2]
        browser.open(link)
        browser.wait_for(f"{ROW_NAMES}.includes({NAME!r})", timeout=120)
        assert "/runs" in browser.evaluate("location.hash")
        assert browser.evaluate(EXPAND_PARENT % NAME)  # child runs are nested under the parent
        browser.wait_for(f"{ROW_NAMES}.length >= 5", timeout=60)
        assert set(browser.evaluate(ROW_NAMES)) == SETTINGS | {NAME}
        # a tracking server's UI is its own address: the link is printed, nothing started
        capsys.readouterr()
        assert main(["ui", NAME, "--tracking-uri", base]) == 0
        assert capsys.readouterr().out.strip() == line
        # without a study: the list of experiments, then each experiment's runs table
        assert main(["ui", "--tracking-uri", base]) == 0
        said = capsys.readouterr().out.splitlines()
        assert said[0] == f"mlflow ui: {base}/#/experiments?workflowType=machine_learning"
        assert f"  {NAME}  {link}" in said
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rest, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "mlflow ui: stopped" in rest and "HEAVY []" in rest, rest + err
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"{base}/health", timeout=2)
