"""dashboards/: one page over real tiny studies (a grid with failed trials, a search with
a pruned one, an MAE grid with reconstructions), checked in headless Chromium; the same
stores opened by a real MLflow server and by optuna-dashboard, over loopback."""

from __future__ import annotations

import base64
import copy
import dataclasses
import datetime
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest

from reports.loader import StudyData

from .conftest import REPO, TINY
from .servers import chromium_path, free_port, mlflow_server, stop_group, unavailable

GRID, SEARCH, MAE = "dash_grid", "dash_search", "dash_mae"
GPT = copy.deepcopy(TINY["gpt"])
GPT["trainer"].update(max_steps=4, val_every=2)
GPT["masking"]["p_bw"] = 0.5  # both directions trained: fw and bw curves
DEPTH = GPT["model"]["depth"]


# ------------------------------------------------------------------ the studies
def _specs() -> list[tuple[dict, list[dict]]]:
    """(spec, trials to enqueue first) for the three studies."""
    grid = {"name": GRID, "model": "gpt", "data": "wikitext-2", "fixed": copy.deepcopy(GPT),
            "grid": {"optim.lr": [3e-3, 1e30]}, "replicates": 2,  # lr 1e30 diverges: FAIL
            "objective": {"metric": "val/fw_loss", "direction": "minimize"}, "ablation": {"drop_one": True}}
    fixed = copy.deepcopy(GPT)
    fixed["optim"] = {"warmup_steps": 0}
    fixed["trainer"].update(max_steps=6, val_every=2)
    search = {"name": SEARCH, "model": "gpt", "data": "wikitext-2", "fixed": fixed,
              "search": {"optim.lr": {"type": "float", "low": 1e-9, "high": 3e-2, "log": True},
                         "masking.p_bw": {"type": "float", "low": 0.0, "high": 0.5}},
              "n_trials": 3, "sampler": "random", "pruner": {"name": "median", "n_startup_trials": 2},
              "objective": "val/fw_loss", "ablation": {"drop_one": False}}
    # two trials that learn, then one that cannot (lr 1e-9): the median pruner stops it
    queue = [{"optim.lr": 1e-2, "masking.p_bw": 0.5}, {"optim.lr": 3e-3, "masking.p_bw": 0.1},
             {"optim.lr": 1e-9, "masking.p_bw": 0.3}]
    mae = copy.deepcopy(TINY["mae"])
    mae["trainer"].update(max_steps=4, val_every=2)
    images = {"name": MAE, "model": "mae", "data": "cifar10", "fixed": mae,
              "grid": {"masking.mask_ratio": [0.5, 0.75]}, "replicates": 2,
              "objective": {"metric": "val/recon_loss", "direction": "minimize"}, "ablation": {"drop_one": False}}
    return [(grid, []), (search, queue), (images, [])]


@pytest.fixture(scope="module")
def out(tmp_path_factory, data_dir, session_cache):
    """An output dir holding the three studies (Optuna sqlite + MLflow sqlite + artifacts)."""
    from lit_modules.paths import Workspace
    from studies.runner import open_study, run_study
    from studies.spec import load_spec

    # MLflow's schema migrations fsync many times: use RAM where the machine has it.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="masklab-dash-", dir=shm if os.access(shm, os.W_OK) else None))
    ws = Workspace.resolve(root / "out", data_dir)
    ws.output_dir.mkdir(parents=True)
    (session_cache / "cache").mkdir(exist_ok=True)  # tokenizers train once per session
    (ws.output_dir / "cache").symlink_to(session_cache / "cache", target_is_directory=True)
    storage, tracking = f"sqlite:///{ws.output_dir / 'optuna.db'}", ws.tracking_uri
    for d, queue in _specs():
        spec = load_spec(d)
        if queue:
            study = open_study(spec, storage, tracking)
            for params in queue:
                study.enqueue_trial(params)
        run_study(spec, ws, storage, tracking, progress=False, report=False, log=lambda m: None)
    yield ws.output_dir
    shutil.rmtree(root, ignore_errors=True)


def storage_of(out: Path) -> str:
    return f"sqlite:///{out / 'optuna.db'}"


def test_the_studies_have_failed_and_pruned_trials(out):
    states = {name: sorted(t.state.name for t in optuna.load_study(study_name=name, storage=storage_of(out)).trials)
              for name in (GRID, SEARCH, MAE)}
    assert states == {GRID: ["COMPLETE", "COMPLETE", "FAIL", "FAIL"], SEARCH: ["COMPLETE", "COMPLETE", "PRUNED"],
                      MAE: ["COMPLETE"] * 4}


# ------------------------------------------------------------------ the command
def _masklab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``masklab ARGS`` in a fresh interpreter that reports whether torch got imported."""
    code = ("import sys; from studies.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', [m for m in ('torch', 'lightning') if m in sys.modules]); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def page(out) -> Path:
    """``masklab dashboard`` over every study in the output dir: the page it wrote."""
    run = _masklab("dashboard", "--output-dir", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "HEAVY []" in run.stdout  # reads the stores only: no torch, no Lightning
    path = out / "dashboard.html"
    assert f"dashboard: {path} (3 studies" in run.stdout
    return path


def test_page_is_self_contained_and_covers_every_study(page):
    import re

    html = page.read_text()
    assert html.count("* plotly.js v") == 1  # plotly.js inlined once
    assert not re.search(r"<script[^>]*\ssrc=", html) and not re.search(r"src=['\"]?https?:", html)
    for name in (GRID, SEARCH, MAE):
        assert f"Study {name}" in html and f"#study={name}" in html
    data = json.loads(re.search(r"id='masklab-data'>(.*?)</script>", html, re.S).group(1))
    views = {v["label"]: v for v in data["views"]}
    assert [m["key"] for m in views[GRID]["metrics"]][:2] == ["fw_loss", "bw_loss"]
    assert views[MAE]["default"] == "recon_loss" and "probe_acc" in [m["key"] for m in views[MAE]["metrics"]]
    # the cross-study metric control: each objective (relative), then the shared GPT metrics
    assert [m["key"] for m in views["all studies"]["metrics"]][:3] == ["objective", "bw_loss", "fw_loss"]
    assert set(data["plots"]["overview-removal"]["variants"]) >= {"objective", "fw_loss", "bw_loss"}
    # fw_loss and bw_loss share one layer-removal figure (both directions side by side): stored once
    grid_id = views[GRID]["id"]
    removal = data["plots"][f"{grid_id}-layer-removal"]["variants"]
    assert removal["fw_loss"] == removal["bw_loss"]
    assert "NonFiniteLossError" in html and "pruned" in html  # the problem trials, with reasons
    assert html.count("src='data:image/png;base64,") == 2  # MAE reconstructions, one per setting


def test_dashboard_of_named_studies_and_bad_spec(out, tmp_path, capsys):
    from studies.cli import main

    target = tmp_path / "two.html"
    assert main(["dashboard", GRID, SEARCH, "--output-dir", str(out), "--out", str(target)]) == 0
    html = target.read_text()
    assert f"Study {GRID}" in html and f"Study {SEARCH}" in html and f"Study {MAE}" not in html
    capsys.readouterr()
    assert main(["dashboard", "no_such_study", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SPEC = 'no_such_study'" in err and GRID in err and "gpt_pbw_demo" in err


def test_zero_studies_say_so(tmp_path, capsys):
    from studies.cli import main

    assert main(["dashboard", "--output-dir", str(tmp_path / "none")]) == 0  # no storage at all
    said = capsys.readouterr().out
    assert "(0 studies" in said and "does not exist: run a study first" in said
    html = (tmp_path / "none" / "dashboard.html").read_text()
    assert "does not exist: run a study first" in html and "plotly.js" not in html
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(storage)  # a storage with no study in it
    target = tmp_path / "empty.html"
    assert main(["dashboard", "--storage", storage, "--output-dir", str(tmp_path), "--out", str(target)]) == 0
    assert f"No studies in {storage} yet" in target.read_text()


# ------------------------------------------------------------------ content and comparison, in memory
def _study(name: str, model: str, metric: str, per_block: dict[int, float], depth: int = 2) -> StudyData:
    """A study in memory: one complete trial per seed; the ``metric`` rises by
    ``per_block[seed]`` per block removed from an intact value of 2 + seed."""
    t0 = pd.Timestamp("2026-01-01T00:00:00")
    trials = pd.DataFrame({
        "number": list(per_block), "state": "COMPLETE", "value": [2.0 + s for s in per_block],
        "duration_s": 90.0, "start": t0, "end": t0 + pd.Timedelta(seconds=90), "setting": "all",
        "seed": list(per_block), "run_id": None, "run_status": "FINISHED", "failure": None,
        "model.parameters": 1000, f"val/{metric}": [2.0 + s for s in per_block]})
    rows = [(n, "all", s, "truncate", k, None, metric, 2.0 + s + slope * k)
            for n, (s, slope) in enumerate(per_block.items()) for k in range(depth + 1)]
    ablation = pd.DataFrame(rows, columns=["number", "setting", "seed", "variant", "removed", "block", "metric",
                                           "value"]).astype({"removed": "Int64", "block": "Int64"})
    empty = pd.DataFrame(columns=["number", "metric", "step", "value"])
    return StudyData(name=name, kind="grid", objective=f"val/{metric}", direction="minimize",
                     spec={"model": model}, swept=[], storage_url="memory", tracking_uri=None, parent_run_id=None,
                     trials=trials, ablation=ablation, curves=empty, intermediate=empty[["number", "step", "value"]])


def test_comparison_measures_change_per_block_removed():
    from dashboards import compare

    gpt = _study("a", "gpt", "fw_loss", {0: 1.0, 1: 3.0})  # seed 0 loses 1 per block, seed 1 loses 3
    bert = _study("b", "bert", "mlm_loss", {0: 0.5})
    other_gpt = _study("c", "gpt", "fw_loss", {0: 2.0})
    studies = [gpt, bert, other_gpt]
    removal = compare.removal_table(studies)
    assert compare.comparison_keys(studies, removal) == ["objective", "fw_loss"]
    cost = compare.per_block_cost(removal, studies, "fw_loss").set_index("study")
    assert list(cost.index) == ["a", "c"]
    assert cost.loc["a", "mean"] == pytest.approx(2.0) and cost.loc["a", "n"] == 2
    assert cost.loc["a", "std"] == pytest.approx(2 ** 0.5) and cost.loc["c", "mean"] == pytest.approx(2.0)
    relative = compare.per_block_cost(removal, studies, "objective").set_index("study")
    assert relative.loc["b", "mean"] == pytest.approx(100 * 0.5 / 2.0)  # % of the intact 2.0 per block
    assert relative.loc["b", "metric"] == "mlm_loss"
    curves = compare.removal_curves(removal, studies, "fw_loss")
    a = curves[curves["study"] == "a"].set_index("removed")
    assert a["mean"].tolist() == pytest.approx([0.0, 2.0, 4.0]) and a["max"].tolist() == pytest.approx([0, 3, 6])


def test_pages_version_depends_on_content_not_time():
    from dashboards.content import assemble
    from dashboards.page import render_page

    studies = [_study("a", "gpt", "fw_loss", {0: 1.0}), _study("b", "bert", "fw_loss", {0: 2.0})]
    dash = assemble(studies, "memory", None)
    first, v1 = render_page(dash)
    later = dataclasses.replace(dash, generated=dash.generated + datetime.timedelta(minutes=5))
    second, v2 = render_page(later)
    assert v1 == v2 and first != second  # only the generation time differs
    changed = [studies[0], _study("b", "bert", "fw_loss", {0: 2.5})]
    assert render_page(assemble(changed, "memory", None))[1] != v1


# ------------------------------------------------------------------ Chromium over the DevTools protocol
class Browser:
    """Headless Chromium driven over the DevTools protocol: one page, its console
    errors, exceptions and requests collected as they arrive."""

    def __init__(self, binary: str):
        import websocket

        self.profile = Path(tempfile.mkdtemp(prefix="masklab-chromium-"))
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--no-first-run",
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port = self._port(self.profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")

    def _port(self, path: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"chromium did not open its DevTools port (exit {self.proc.returncode})")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout)

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.1)

    def errors(self) -> list[str]:
        """Every console error, uncaught exception and error log entry so far."""
        self.evaluate("0")  # read what has arrived
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                found.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                found.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(f"log: {p['entry']['text']} ({p['entry'].get('url')})")
        return found

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> Path:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        stop_group(self.proc, timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    binary = chromium_path()
    if binary is None:
        unavailable("chromium", "apt-get install chromium")
    try:
        import websocket  # noqa: F401
    except ImportError:
        unavailable("websocket-client", "pip install -e '.[dev]'")
    b = Browser(binary)
    yield b
    b.close()


# Per visible figure slot: id, plotly SVG roots, traces plotly laid out, marks drawn
# (lines, points, bars, boxes, heatmap images, WebGL canvases of parallel coordinates), height.
RENDERED = """(() => [...document.querySelectorAll("section.view:not([hidden]) div.plot:not([hidden])")].map(d => ({
  id: d.id, svg: d.querySelectorAll(".main-svg").length, traces: (d._fullData || []).length,
  marks: d.querySelectorAll("path.js-line, path.point, .bars path, .boxes path, .heatmaplayer image, "
                            + ".gl-container canvas").length,
  height: d.getBoundingClientRect().height})))()"""
ALL_DRAWN = f"{RENDERED}.every(p => p.svg > 0 && p.traces > 0 && p.marks > 0)"


def _pick(b: Browser, control: str, value: str) -> None:
    b.evaluate(f"""(() => {{ const s = document.getElementById({json.dumps(control)});
        s.value = {json.dumps(value)}; s.dispatchEvent(new Event("change")); }})()""")


def _check_drawn(b: Browser, where: str) -> list[dict]:
    try:
        b.wait_for(ALL_DRAWN, timeout=20)
    except TimeoutError:
        pytest.fail(f"{where}: figures not drawn: {b.evaluate(RENDERED)}")
    plots = b.evaluate(RENDERED)
    assert all(p["height"] > 100 for p in plots), (where, plots)
    assert not b.errors(), (where, b.errors())
    return plots


def _check_png(path: Path) -> None:
    """A real picture of the page: big enough, many colours, not mostly blank."""
    from PIL import Image

    img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
    assert img.width >= 1000 and img.height >= 800, img.size
    small = img.resize((img.width // 4, img.height // 4))
    pixels = list(small.getdata())
    assert len(set(pixels)) > 200, "screenshot has too few colours to show figures"
    ink = sum(1 for p in pixels if sum(p) < 720) / len(pixels)  # not white or near-white
    assert ink > 0.05, f"screenshot is {1 - ink:.0%} blank"


def test_page_renders_in_chromium_and_its_controls_work(page, browser, tmp_path):
    browser.open(page.as_uri())
    plots = _check_drawn(browser, "overview")
    assert {p["id"] for p in plots} >= {"overview-states", "overview-removal", "overview-per-block"}
    assert browser.evaluate("document.querySelector('section.view:not([hidden]) table a').textContent") == GRID
    # every request stayed in the file: plotly.js and the data are inline
    assert all(u.startswith(("file:", "data:")) for u in browser.requested()), browser.requested()
    shots = [browser.screenshot(tmp_path / "dashboard-overview.png")]
    views = browser.evaluate("[...document.getElementById('view-select').options].map(o => [o.value, o.text])")
    assert [label for _, label in views] == ["all studies", GRID, MAE, SEARCH]
    for value, label in views:
        _pick(browser, "view-select", value)
        metrics = browser.evaluate("[...document.getElementById('metric-select').options].map(o => o.value)")
        assert metrics, label
        for metric in metrics:
            _pick(browser, "metric-select", metric)
            drawn = _check_drawn(browser, f"{label} / {metric}")
            assert len(drawn) >= (2 if value == "overview" else 5), (label, metric, drawn)
        assert browser.evaluate("location.hash").startswith("#" if value == "overview" else f"#study={label}")
    # the study with failed trials: figures, and the failures listed with their reasons
    browser.open(page.as_uri() + f"#study={GRID}&metric=bw_loss")
    assert browser.evaluate("document.getElementById('metric-select').value") == "bw_loss"
    _check_drawn(browser, GRID)
    text = browser.evaluate("document.querySelector('section.view:not([hidden])').innerText")
    assert "Trials that did not complete" in text and "NonFiniteLossError" in text
    shots.append(browser.screenshot(tmp_path / "dashboard-grid.png"))
    browser.open(page.as_uri() + f"#study={MAE}")
    drawn = _check_drawn(browser, MAE)
    # the effects of the mask ratio (2 seeds each): the forest plot is drawn, the findings are stated
    forest = [p for p in drawn if p["id"].endswith("-forest")]
    assert forest and forest[0]["marks"] >= 1, drawn
    text = browser.evaluate("document.querySelector('section.view:not([hidden])').innerText")
    assert "Findings" in text and "masking.mask_ratio = 0.75" in text, text[:2000]
    browser.wait_for("[...document.querySelectorAll('section.view:not([hidden]) .gallery img')]"
                     ".every(i => i.complete && i.naturalWidth > 0)")
    for shot in shots:
        _check_png(shot)
    print("screenshots:", *shots)


def test_report_forest_plot_renders_in_chromium(out, browser, tmp_path):
    """The study report's forest plot (effects of the mask ratio, paired over 2 seeds) is
    drawn by plotly in the browser, next to the findings."""
    from reports.loader import load_study
    from reports.study_report import write_report

    _, html_path = write_report(load_study(MAE, storage_of(out)), tmp_path / "report")
    browser.open(html_path.as_uri())
    drawn = """(() => { const d = document.getElementById('forest').nextElementSibling.querySelector('.plotly-graph-div');
        return d ? {svg: d.querySelectorAll('.main-svg').length, traces: (d._fullData || []).length,
                    points: d.querySelectorAll('path.point').length} : null; })()"""
    browser.wait_for(f"(() => {{ const r = {drawn}; return r && r.points > 0; }})()", timeout=20)
    assert browser.evaluate(drawn)["traces"] >= 1
    assert "masking.mask_ratio = 0.75" in browser.evaluate("document.getElementById('findings').nextElementSibling.innerText")
    assert not browser.errors(), browser.errors()


def test_empty_page_renders_its_message_in_chromium(browser, tmp_path):
    from dashboards.build import load_dashboard, write_dashboard

    path, _ = write_dashboard(load_dashboard(f"sqlite:///{tmp_path / 'none.db'}"), tmp_path / "empty.html")
    browser.open(path.as_uri())
    text = browser.evaluate("document.body.innerText")
    assert "No studies" in text and "does not exist" in text
    assert browser.evaluate("document.getElementById('metric-select').disabled") is True
    assert not browser.errors(), browser.errors()


# ------------------------------------------------------------------ --serve
def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_serve_refreshes_while_a_study_runs(out, browser, tmp_path):
    """The served page follows the store: a new trial changes the version, and an open
    page reloads itself (keeping its view) and shows it. (Served from the Optuna store
    alone, which keeps each rebuild short; the MLflow side is checked above.)"""
    import sqlite3

    # A copy of the Optuna store (the shared one stays as it is); sqlite's backup copies
    # what its write-ahead log holds too.
    with sqlite3.connect(out / "optuna.db") as src, sqlite3.connect(tmp_path / "optuna.db") as dst:
        src.backup(dst)
    storage = storage_of(tmp_path)
    cmd = [sys.executable, "-m", "studies.cli", "dashboard", SEARCH, "--serve", "--port", "0", "--refresh", "0.5",
           "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dashboard: serving http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        version = json.loads(_get(url + "version.json"))["version"]
        assert f'"version":"{version}"' in _get(url) and _get(url) == (tmp_path / "dashboard.html").read_text()
        browser.open(url + f"#study={SEARCH}")
        _check_drawn(browser, "served page")
        browser.evaluate("window.notReloaded = true")
        time.sleep(1.5)  # rebuilds of unchanged stores: the same version, no reload
        assert json.loads(_get(url + "version.json"))["version"] == version
        assert browser.evaluate("window.notReloaded") is True
        assert not (tmp_path / "absent.db").exists()  # reading never creates a store
        study = optuna.load_study(study_name=SEARCH, storage=storage)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                  user_attrs={"masklab.failure": "served-page-check"}))
        deadline = time.monotonic() + 45
        while json.loads(_get(url + "version.json"))["version"] == version:
            assert time.monotonic() < deadline, "the page was not rebuilt after a new trial"
            time.sleep(0.3)
        browser.wait_for("window.notReloaded === undefined && document.readyState === 'complete'", timeout=15)
        assert SEARCH in browser.evaluate("document.querySelector('section.view:not([hidden]) h1').textContent")
        _check_drawn(browser, "reloaded page")
        assert "served-page-check" in browser.evaluate("document.body.innerText")
        assert "served-page-check" in (tmp_path / "dashboard.html").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "dashboard: stopped" in rest, err


# ------------------------------------------------------------------ MLflow server (what its UI reads)
def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_mlflow_server_shows_the_study_runs(out):
    with mlflow_server(f"sqlite:///{out / 'mlflow.db'}", out / "mlartifacts") as base:
        exp = _api(base, "experiments/get-by-name", experiment_name=GRID)["experiment"]
        search = {"experiment_ids": [exp["experiment_id"]], "max_results": 100}
        [parent] = _api(base, "runs/search", {**search, "filter": "tags.`masklab.role` = 'study'"})["runs"]
        parent_id = parent["info"]["run_id"]
        children = _api(base, "runs/search", {**search, "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})
        runs = children["runs"]
        assert len(runs) == 4
        by_status = {}
        for run in runs:
            by_status.setdefault(run["info"]["status"], []).append(run)
        assert sorted((s, len(r)) for s, r in by_status.items()) == [("FAILED", 2), ("FINISHED", 2)]
        for run in by_status["FINISHED"]:
            run_id = run["info"]["run_id"]
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert float(params["optim.lr"]) == 3e-3 and params["model.depth"] == str(DEPTH)
            assert {"val/fw_loss", "val/bw_loss", "ablation/fw_loss", "ablation/bw_loss"} <= set(metrics)
            history = _api(base, "metrics/get-history", run_id=run_id, metric_key="ablation/fw_loss")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(DEPTH + 1))  # step = blocks removed
            files = {f["path"] for f in _api(base, "artifacts/list", run_id=run_id).get("files", [])}
            assert "ablation.csv" in files, files
            csv = _get(f"{base}/get-artifact?" + urllib.parse.urlencode({"path": "ablation.csv", "run_uuid": run_id}))
            assert csv.splitlines()[0].split(",")[:5] == ["variant", "removed", "block", "metric", "value"]
        for run in by_status["FAILED"]:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert "NonFiniteLossError" in tags["masklab.failure"]


# ------------------------------------------------------------------ optuna-dashboard
def test_optuna_dashboard_opens_the_study(out):
    """``optuna-dashboard sqlite:///.../optuna.db`` (as the README says) lists the studies,
    and its study API has the trials with their states, intermediate values and the
    user attributes linking them to MLflow."""
    binary = Path(sys.executable).parent / "optuna-dashboard"
    if not binary.exists():
        unavailable("optuna-dashboard", "pip install -e '.[dev]'")
    port = free_port()
    proc = subprocess.Popen([str(binary), storage_of(out), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                summaries = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        ids = {s["study_name"]: s["study_id"] for s in summaries}
        assert set(ids) == {GRID, SEARCH, MAE}
        detail = json.loads(_get(f"{base}/api/studies/{ids[SEARCH]}"))
        trials = detail["trials"]
        assert sorted(t["state"] for t in trials) == ["Complete", "Complete", "Pruned"]
        for t in trials:
            attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            assert attrs.get("masklab.mlflow_run_id"), attrs
            assert t["intermediate_values"], t
        pruned = next(t for t in trials if t["state"] == "Pruned")
        assert "pruned" in {a["key"]: a["value"] for a in pruned["user_attrs"]}["masklab.failure"]
        assert {p["name"] for p in trials[0]["params"]} == {"optim.lr", "masking.p_bw"}
        grid = json.loads(_get(f"{base}/api/studies/{ids[GRID]}"))["trials"]
        assert sorted(t["state"] for t in grid) == ["Complete", "Complete", "Fail", "Fail"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
