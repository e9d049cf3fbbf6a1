"""Transfer results in the findings, the study report and the dashboard: a store written the
way the runner writes it (child runs with ``transfer/<task>/probe_*`` histories by layer,
fine-tune and baseline values, the ``transfer.*`` list params), with a planted +10 points
effect of p_bw on the sst2 probe: the findings resolve it with an interval that covers it,
the Transfer section shows means with intervals against the three baselines, the
layer-wise figure has one line per setting and the reference lines, and a study without
transfer metrics has no Transfer section."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest

from reports import transfer
from reports.findings import chance_levels, findings_frame, sentences
from reports.loader import load_study
from reports.study_report import build_report, write_report

from .test_reports import Stores

STUDY, PLAIN = "transfer_pbw", "no_transfer"
SEEDS = 3
DEPTH = 2  # tests.test_reports.Stores logs model.depth = 2: layers 0 (embeddings), 1, 2
P_BW = [0.0, 0.1]
SST2 = [0.55, 0.62, 0.70]  # the primary probe by layer at p_bw = 0
PLANTED = [0.0, 0.05, 0.10]  # p_bw = 0.1 adds this by layer: +10 points at the top layer
BW = [0.54, 0.58, 0.64]  # the probe on backward features (no effect)
AGNEWS = [0.30, 0.42, 0.51]  # a second task, no effect
MAJORITY, TFIDF, RANDOM_INIT, FINETUNE = 0.509, 0.78, 0.56, 0.83
SEED_SD, NOISE_SD = 0.02, 0.004  # shared by a seed's settings (pairing removes it); per trial
D = optuna.distributions
DISTS = {"masking.p_bw": D.CategoricalDistribution(P_BW), "seed": D.CategoricalDistribution(list(range(SEEDS)))}
SPEC = {"model": "gpt", "data": "wikitext-2", "grid": {"masking.p_bw": P_BW}, "replicates": SEEDS,
        "objective": {"metric": "val/fw_loss", "direction": "minimize"}, "fixed": {"data": {"vocab_size": 2048}}}


def _transfer_metrics(p_bw: float, seed_effect: float, rng: np.random.Generator) -> dict[str, list]:
    def noisy(v: float) -> float:
        return v + seed_effect + rng.normal(0, NOISE_SD)

    gain = PLANTED if p_bw > 0 else [0.0] * (DEPTH + 1)
    return {
        "transfer/sst2/probe_acc": [(k, noisy(v + g)) for k, (v, g) in enumerate(zip(SST2, gain))],
        "transfer/sst2/probe_acc_bw": [(k, noisy(v)) for k, v in enumerate(BW)],
        "transfer/sst2/finetune_acc": [(0, noisy(FINETUNE))],
        "transfer/sst2/baseline_majority": [(0, MAJORITY)],
        "transfer/sst2/baseline_tfidf": [(0, TFIDF)],
        "transfer/sst2/baseline_random_init": [(0, RANDOM_INIT + rng.normal(0, 0.001))],
        "transfer/agnews/probe_acc": [(k, noisy(v)) for k, v in enumerate(AGNEWS)],
        "transfer/agnews/baseline_majority": [(0, 0.25)],
        "transfer/agnews/baseline_tfidf": [(0, 0.60)],
        "transfer/agnews/baseline_random_init": [(0, 0.33)],
    }


def _transfer_csv(stores: Stores, run_id: str, metrics: dict[str, list]) -> None:
    """The run's ``transfer.csv`` as lit_modules/transfer/stage.py writes it: it names the
    primary feature, which the metric names leave out."""
    import pandas as pd

    feature = {"": "fw", "bw": "bw"}
    rows = [{"task": k.split("/")[1], "feature": feature[k.split("probe_acc")[1].lstrip("_")], "layer": step,
             "metric": k, "value": v} if "/probe_" in k else
            {"task": k.split("/")[1], "feature": None, "layer": None, "metric": k, "value": v}
            for k, series in metrics.items() if k.startswith("transfer/") for step, v in series]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transfer.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        stores.client.log_artifact(run_id, str(path))


def _build(stores: Stores) -> None:
    from mlflow.entities import Param

    rng = np.random.default_rng(1)  # a draw where only the planted effect is resolved
    seed_effect = rng.normal(0, SEED_SD, SEEDS)
    study, exp, parent = stores.study(STUDY, {"name": STUDY, **SPEC}, "grid", ["masking.p_bw"])
    for p_bw in P_BW:
        for seed in range(SEEDS):
            fw = 3.0 + rng.normal(0, 0.01)
            metrics = {"val/fw_loss": [(10, fw)], "val/bw_loss": [(10, fw + 0.1)],
                       **_transfer_metrics(p_bw, seed_effect[seed], rng)}
            number = stores.trial(study, exp, parent, {"masking.p_bw": p_bw, "seed": seed}, "COMPLETE", value=fw,
                                  metrics=metrics, distributions=DISTS)
            run_id = study.trials[number].user_attrs["masklab.mlflow_run_id"]
            # lit_modules.config.flatten turns the tuples into lists and studies.tracking logs
            # str() of them; no features listed = the family's default (GPT: fw first)
            stores.client.log_batch(run_id, params=[Param("transfer.tasks", str(["sst2", "agnews"])),
                                                    Param("transfer.features", str([]))])
            if number == 0:
                _transfer_csv(stores, run_id, metrics)
    study, exp, parent = stores.study(PLAIN, {"name": PLAIN, **SPEC}, "grid", ["masking.p_bw"])
    for p_bw in P_BW:
        for seed in range(2):
            fw = 3.0 + p_bw + 0.01 * seed
            stores.trial(study, exp, parent, {"masking.p_bw": p_bw, "seed": seed}, "COMPLETE", value=fw,
                         metrics={"val/fw_loss": [(10, fw)]}, distributions=DISTS)


@pytest.fixture(scope="module")
def stores():
    shm = Path("/dev/shm")  # MLflow's sqlite migrations fsync many times: RAM where there is some
    root = Path(tempfile.mkdtemp(prefix="masklab-transfer-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                 else None))
    s = Stores(root)
    _build(s)
    yield s
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def data(stores):
    return load_study(STUDY, stores.storage_url, stores.tracking_uri)


@pytest.fixture(scope="module")
def report(data):
    return build_report(data)


# ------------------------------------------------------------------ loader
def test_loader_keeps_top_layer_values_layer_histories_and_params(data):
    t = data.complete.sort_values("number")
    assert {"transfer/sst2/probe_acc", "transfer/sst2/baseline_tfidf", "transfer/agnews/probe_acc",
            "transfer/sst2/finetune_acc"} <= set(t.columns)
    lay = data.transfer_layers
    assert set(lay["layer"]) == {0, 1, 2} and set(lay["task"]) == {"sst2", "agnews"}
    assert not lay["metric"].str.contains("baseline|finetune").any()  # only the probes have layers
    top = lay[(lay["metric"] == "transfer/sst2/probe_acc") & (lay["layer"] == DEPTH)].set_index("number")["value"]
    assert t.set_index("number")["transfer/sst2/probe_acc"].to_dict() == pytest.approx(top.to_dict())
    assert transfer.tasks(data) == ["sst2", "agnews"]  # the runs' order, not the alphabet
    assert transfer.primary_feature(data) == "fw"  # named by the first run's transfer.csv
    sst2 = lay[lay["task"] == "sst2"].drop_duplicates("metric").set_index("metric")["feature"]
    assert sst2.to_dict() == {"transfer/sst2/probe_acc": "fw", "transfer/sst2/probe_acc_bw": "bw"}
    unnamed = dataclasses.replace(data, transfer_layers=lay.assign(feature=""))
    assert transfer.primary_feature(unnamed) is None  # the param says [] (the family default)
    assert transfer.param_list("['sst2', 'agnews']") == ["sst2", "agnews"] and transfer.param_list("[]") == []


# ------------------------------------------------------------------ findings
def test_findings_state_the_planted_transfer_effect(data):
    table = findings_frame(data)
    r = table[(table.metric == "transfer/sst2/probe_acc") & (table.factor == "masking.p_bw")].iloc[0]
    assert r["level"] == "0.1" and r["n"] == SEEDS and r["paired"] and r["resolved"]
    assert r["ci_low"] < PLANTED[-1] < r["ci_high"] and r["mean_diff"] == pytest.approx(PLANTED[-1], abs=0.02)
    bw = table[table.metric == "transfer/sst2/probe_acc_bw"].iloc[0]
    assert bw["ci_low"] < 0 < bw["ci_high"]  # no effect planted on the backward features
    text = sentences(data, table)
    said = [s for s in text if "transfer/sst2/probe_acc " in s]
    assert said and said[0].startswith("masking.p_bw = 0.1 instead of 0 raises transfer/sst2/probe_acc by ")
    assert " points [" in said[0] and said[0].endswith("(paired over n = 3 seeds; higher is better).")
    low, high = (float(x) for x in said[0].split(" points [")[1].split("]")[0].split(", "))
    assert low < 100 * PLANTED[-1] < high  # the interval, in points, covers the planted +10


def test_baselines_are_references_not_findings_metrics(data, tmp_path):
    table = findings_frame(data)
    assert not table["metric"].str.contains("baseline_").any()
    assert {"transfer/sst2/probe_acc", "transfer/sst2/probe_acc_bw", "transfer/sst2/finetune_acc",
            "transfer/agnews/probe_acc"} <= set(table["metric"])
    assert transfer.findings_metrics(data)[:3] == ["transfer/sst2/probe_acc", "transfer/sst2/probe_acc_bw",
                                                   "transfer/sst2/finetune_acc"]
    write_report(data, tmp_path)
    assert "baseline_" not in (tmp_path / "findings.csv").read_text()


def test_chance_levels_and_direction(data):
    levels = chance_levels(data, ["transfer/sst2/probe_acc", "transfer/sst2/probe_acc_bw",
                                  "transfer/agnews/finetune_acc", "transfer/sst2/baseline_majority"])
    assert levels["transfer/sst2/probe_acc"].value == 0.5 and levels["transfer/sst2/probe_acc_bw"].value == 0.5
    assert levels["transfer/agnews/finetune_acc"].value == 0.25  # not 1/V of the text model
    assert "transfer/sst2/baseline_majority" not in levels
    assert transfer.chance("transfer/cifar10/probe_acc_cls")[0] == pytest.approx(0.1)
    assert transfer.chance("transfer/tiny-imagenet/probe_acc")[0] == pytest.approx(1 / 200)
    assert transfer.chance("transfer/moving-mnist-digits/probe_acc")[0] == pytest.approx(1 / 45)
    assert transfer.chance("transfer/moving-mnist-velocity/probe_r2")[0] == 0.0
    assert transfer.higher_is_better("transfer/moving-mnist-velocity/probe_r2")
    assert transfer.higher_is_better("transfer/sst2/probe_acc_fw_bw") and not transfer.higher_is_better("val/fw_loss")
    assert not any("is at chance" in s and "transfer/sst2" in s for s in sentences(data, findings_frame(data)))


# ------------------------------------------------------------------ the report
def test_transfer_table_shows_means_with_intervals_and_the_three_baselines(data, report):
    assert [t.task for t in report.transfer] == ["sst2", "agnews"]
    sst2 = report.transfer[0]
    assert sst2.title == "sst2 (2 classes; chance 1/2 = 0.500)"
    frame = sst2.table.frame
    assert frame["setting"].tolist() == ["p_bw=0", "p_bw=0.1"] and frame["n"].tolist() == [SEEDS, SEEDS]
    assert list(frame.columns) == [
        "setting", "n", "probe_acc (fw) [95% CI]", "probe_acc_bw [95% CI]", "finetune_acc [95% CI]",
        "baseline: majority", "baseline: TF-IDF", "baseline: random init", "probe_acc − random init [95% CI]",
        "best layer of probe_acc"]
    assert frame["baseline: majority"].tolist() == ["0.5090"] * 2 and frame["baseline: TF-IDF"].tolist() == ["0.7800"] * 2
    assert [float(c) for c in frame["baseline: random init"]] == pytest.approx([RANDOM_INIT] * 2, abs=0.003)
    num = transfer.summary(data, "sst2")
    done = data.complete
    for setting, mean in zip(num["setting"], num["transfer/sst2/probe_acc mean"]):
        assert mean == pytest.approx(done.loc[done.setting == setting, "transfer/sst2/probe_acc"].mean())
        cell = frame.loc[frame.setting == setting, "probe_acc (fw) [95% CI]"].iloc[0]
        assert cell.startswith(f"{mean:.4f} [")
    assert (num["transfer/sst2/probe_acc ci_low"] < num["transfer/sst2/probe_acc mean"]).all()
    assert frame["best layer of probe_acc"].str.startswith("2 of 2: ").all()
    assert any("best probe_acc at the top layer (higher is better)" in s and "p_bw=0.1" in s and "TF-IDF" in s
               for s in sst2.statements)


def test_report_has_a_transfer_section_after_findings(data, tmp_path):
    md_path, html_path = write_report(data, tmp_path / "r")
    md, html = md_path.read_text(), html_path.read_text()
    assert md.index("## Findings") < md.index("## Transfer") < md.index("## Warnings")
    assert md.index("### sst2 (2 classes") < md.index("### agnews (4 classes")
    top = transfer.summary(data, "sst2").set_index("setting")["transfer/sst2/probe_acc mean"]
    assert f"| p_bw=0.1 | 3 | {top['p_bw=0.1']:.4f} [" in md and "| 0.5090 | 0.7800 | 0.5" in md
    assert "(report.html#transfer-sst2-layers)" in md
    assert html.index("id='findings'") < html.index("id='transfer'") < html.index("id='warnings'")
    assert "id='transfer-sst2-layers'" in html and html.count("* plotly.js v") == 1


def test_layer_wise_figure_has_one_line_per_setting_and_the_reference_lines(report, tmp_path):
    fig = report.transfer[0].figure.figure
    assert fig is not None
    panels = [a.text for a in fig.layout.annotations]
    assert panels == ["probe_acc (fw)", "probe_acc_bw"]
    lines = [t for t in fig.data if t.meta == "setting"]
    assert len(lines) == 2 * len(panels)  # one per setting in each panel
    assert sorted({t.name for t in lines}) == ["p_bw=0", "p_bw=0.1"] and sum(t.showlegend for t in lines) == 2
    assert all(list(t.x) == ["0", "1", "2"] for t in lines) and fig.layout.xaxis.type == "category"
    top = {t.name: t.y[-1] for t in lines if t.xaxis == "x"}
    assert top["p_bw=0.1"] - top["p_bw=0"] == pytest.approx(PLANTED[-1], abs=0.02)
    assert all(t.error_y.array is not None and len(t.error_y.array) == 3 for t in lines)
    refs = {t.name.split(" (")[0] for t in fig.data if t.meta == "reference"}
    assert refs == {"majority class", "TF-IDF + logistic regression", "same architecture at random init", "chance"}
    chance = [t for t in fig.data if t.meta == "reference" and t.name.startswith("chance")]
    assert chance[0].y[0] == 0.5
    assert fig.layout.xaxis.title.text.startswith("layer") and fig.layout.yaxis.title.text == "probe accuracy"
    path = tmp_path / "layers.html"
    fig.write_html(path, include_plotlyjs=False)
    assert path.stat().st_size > 1000


def test_transfer_objective_is_maximised_and_named(data):
    as_obj = dataclasses.replace(data, objective="transfer/sst2/probe_acc", direction="maximize")
    report = build_report(as_obj)
    header = dict(report.header)
    assert header["best setting"].startswith("p_bw=0.1: mean transfer/sst2/probe_acc ")
    curves = [f for f in report.figures if f.anchor == "validation-curves"][0]
    assert curves.figure is None and "measured after training" in curves.note


def test_study_without_transfer_has_no_transfer_section(stores, tmp_path):
    plain = load_study(PLAIN, stores.storage_url, stores.tracking_uri)
    assert plain.transfer_layers.empty and not transfer.columns(plain)
    assert build_report(plain).transfer == []
    md, html = (p.read_text() for p in write_report(plain, tmp_path / "plain"))
    assert "## Transfer" not in md and "id='transfer'" not in html and "## Findings" in md


# ------------------------------------------------------------------ the dashboard
def test_dashboard_shows_the_transfer_table_and_figure(data, stores):
    from dashboards.content import ALL, Note, Plot, Table, assemble, metric_keys
    from dashboards.page import render_page

    dash = assemble([data], stores.storage_url, stores.tracking_uri)
    view = dash.views[1]
    titles = [getattr(b, "title", None) for b in view.blocks]
    notes = [i for i, b in enumerate(view.blocks) if isinstance(b, Note) and b.title == "Transfer"]
    assert notes and titles.index("Findings") < notes[0] < [type(b).__name__ for b in view.blocks].index("Warnings")
    tables = [b for b in view.blocks if isinstance(b, Table) and "transfer-sst2" in b.anchor]
    assert tables and "baseline: random init" in tables[0].frame.columns
    plots = {b.id: b for b in view.blocks if isinstance(b, Plot)}
    layers = plots[f"{view.id}-transfer-sst2-layers"]
    assert set(layers.variants) == {ALL}
    assert len([t for t in layers.variants[ALL].data if t.meta == "setting"]) == 4
    keys = metric_keys(data)
    assert "transfer/sst2/probe_acc" in keys and not any("baseline" in k for k in keys)
    assert "transfer/sst2/probe_acc" in plots[f"{view.id}-forest"].variants
    assert "transfer/sst2/probe_acc" in plots[f"{view.id}-metric-vs-params"].variants
    html, _ = render_page(dash)
    assert "scores per setting against the baselines" in html and f"{view.id}-transfer-sst2-layers" in html
