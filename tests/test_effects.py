"""Findings against known truth: effects planted in stores written the way the runner
writes them are resolved with intervals that cover them, a null factor is not, the
interaction is estimated, the power figures agree with the closed forms and with
simulation, and the 95% interval covers a null effect 95% of the time."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats

from reports.effects import ALPHA, compare, detectable, holm, paired, welch
from reports.findings import findings_frame, sentences
from reports.loader import load_study

from .test_reports import Stores

SEEDS = 8
BASE = 5.0  # the metric at the baseline setting
PLANTED = 0.05  # masking.p_bw = 0.1 raises the metric by 5% of BASE at depth 2 ...
INTERACTION = 0.03  # ... and by 5% + 3% at depth 4
SEED_SD, NOISE_SD = 0.10, 0.02  # shared by a seed's settings (pairing removes it); per trial
D = optuna.distributions
DISTS = {"masking.p_bw": D.CategoricalDistribution([0.0, 0.1]), "model.depth": D.CategoricalDistribution([2, 4]),
         "model.width": D.CategoricalDistribution([32, 64]), "seed": D.CategoricalDistribution(list(range(SEEDS)))}


def truth(p_bw: float, depth: int) -> float:
    return BASE * (1 + PLANTED * (p_bw > 0) + INTERACTION * (p_bw > 0) * (depth == 4))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2 x 2 x 2 grid (p_bw planted, depth with an interaction, width null) x 8 seeds."""
    stores = Stores(tmp_path_factory.mktemp("planted"))
    grid = {"masking.p_bw": [0.0, 0.1], "model.depth": [2, 4], "model.width": [32, 64]}
    spec = {"name": "planted", "model": "gpt", "data": "wikitext-2", "grid": grid, "replicates": SEEDS,
            "objective": {"metric": "val/m", "direction": "minimize"}, "fixed": {"data": {"vocab_size": 2048}}}
    study, exp, parent = stores.study("planted", spec, "grid", list(grid))
    rng = np.random.default_rng(1)  # one draw; test_ci_covers_... checks the 95% rate
    seed_effect = rng.normal(0, SEED_SD, SEEDS)
    for p_bw in grid["masking.p_bw"]:
        for depth in grid["model.depth"]:
            for width in grid["model.width"]:
                for seed in range(SEEDS):
                    v = truth(p_bw, depth) + seed_effect[seed] + rng.normal(0, NOISE_SD)
                    params = {"masking.p_bw": p_bw, "model.depth": depth, "model.width": width, "seed": seed}
                    stores.trial(study, exp, parent, params, "COMPLETE", value=v, distributions=DISTS,
                                 metrics={"val/m": [(10, v)], "val/null": [(10, 1.0 + rng.normal(0, 0.05))]})
    return load_study("planted", stores.storage_url, stores.tracking_uri)


def _row(table, metric, factor, level, held):
    hit = table[(table.metric == metric) & (table.factor == factor) & (table.level == level) & (table.held == held)]
    assert len(hit) == 1, (metric, factor, level, held)
    return hit.iloc[0]


def test_planted_effect_is_resolved_and_covered(planted):
    table = findings_frame(planted)
    for depth, effect in ((2, PLANTED), (4, PLANTED + INTERACTION)):
        for width in (32, 64):
            r = _row(table, "val/m", "masking.p_bw", "0.1", f"model.depth={depth};model.width={width}")
            assert r["n"] == SEEDS and r["resolved"] and r["p_holm"] < ALPHA
            se = (r["ci_high"] - r["ci_low"]) / (2 * stats.t.ppf(1 - ALPHA / 2, SEEDS - 1))
            assert abs(r["mean_diff"] - BASE * effect) < 4 * se  # each of the four estimates is on target
    pooled = _row(table, "val/m", "masking.p_bw", "0.1", "pooled")
    assert pooled["resolved"] and pooled["ci_low"] < BASE * (PLANTED + INTERACTION / 2) < pooled["ci_high"]


def test_null_factor_is_not_resolved(planted):
    table = findings_frame(planted)
    width = table[(table.metric == "val/m") & (table.factor == "model.width")]
    assert len(width) == 5 and not _row(table, "val/m", "model.width", "64", "pooled")["resolved"]
    null = table[table.metric == "val/null"]
    # Familywise: after Holm's correction no comparison of a null factor or metric is significant.
    assert (width["p_holm"] > ALPHA).all() and (null["p_holm"] > ALPHA).all()
    assert (table["p_holm"] >= table["p"]).all()


def test_interaction_is_estimated(planted):
    table = findings_frame(planted)
    r = _row(table, "val/m", "masking.p_bw:model.depth", "0.1:4", "pooled")
    assert r["baseline"] == "0:2" and r["resolved"]
    assert r["ci_low"] < BASE * INTERACTION < r["ci_high"]
    null = _row(table, "val/m", "masking.p_bw:model.width", "0.1:64", "pooled")
    assert not null["resolved"]


def test_sentences_state_the_planted_effect(planted):
    text = sentences(planted, findings_frame(planted))
    first = text[0]
    assert first.startswith("masking.p_bw = 0.1 instead of 0 raises val/m by ") and "paired over n = 8 seeds" in first
    assert any("is not resolved at n = 8" in t and "model.width" in t for t in text)


def test_power_matches_the_closed_forms_and_simulation():
    for n in (5, 8, 20):
        se, df = 1 / math.sqrt(n), n - 1
        t_form = (stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(0.8, df)) * se
        assert detectable(se, df) == pytest.approx(t_form, rel=0.10)
    assert detectable(0.1, 99) == pytest.approx((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 0.1, rel=0.02)
    # at the MDE a paired t-test rejects in 80% of simulated studies
    rng = np.random.default_rng(3)
    n, sd = 4, 1.0
    delta = detectable(sd / math.sqrt(n), n - 1)
    d = rng.normal(delta, sd, size=(4000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert 0.78 <= power <= 0.82, power
    # seeds needed: the closed form n = ((z + z) sd / effect)^2 + z^2 / 2 (Guenther's t correction)
    est = paired(np.array([0.5 - 1.0, 0.5 + 1.0, 0.5, 0.5 - 0.5, 0.5 + 0.5]), np.ones(5))  # mean 0.5
    z = stats.norm.ppf(0.975)
    closed = ((z + stats.norm.ppf(0.8)) * est.unit_sd / 0.5) ** 2 + z**2 / 2
    assert est.n_needed == pytest.approx(closed, rel=0.10)
    assert detectable(est.unit_sd / math.sqrt(est.n_needed), est.n_needed - 1) <= 0.5
    assert detectable(est.unit_sd / math.sqrt(est.n_needed - 1), est.n_needed - 2) > 0.5


def test_ci_covers_a_null_effect_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    hits_paired = hits_welch = 0
    for _ in range(1000):
        lo, hi = paired(rng.normal(0, 1, 4), np.ones(4)).ci
        hits_paired += lo <= 0 <= hi
        lo, hi = welch(rng.normal(0, 1, 5), rng.normal(0, 2, 7)).ci
        hits_welch += lo <= 0 <= hi
    assert 930 <= hits_paired <= 970 and 930 <= hits_welch <= 970, (hits_paired, hits_welch)


def test_unpaired_settings_use_welch():
    frame = pd.DataFrame({"f": [0, 0, 0, 1, 1, 1], "seed": [0, 1, 2, 3, 4, 5], "m": [1.0, 1.2, 0.9, 2.0, 2.1, 1.8]})
    r = compare(frame, ["f"], ["m"]).iloc[0]
    w = stats.ttest_ind([2.0, 2.1, 1.8], [1.0, 1.2, 0.9], equal_var=False)
    assert not r["paired"] and r["p"] == pytest.approx(w.pvalue, rel=1e-9)


def test_holm_matches_the_step_down_rule():
    got = holm([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert got[:3].tolist() == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(got[3]) and got[4] == pytest.approx(0.02)
