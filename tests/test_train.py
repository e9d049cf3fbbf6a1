"""End to end: ``masklab train`` on a shrunk gpt_tiny, read back from MLflow."""

from __future__ import annotations

import pytest

from studies.cli import main

from .conftest import SPECS

DEPTH = 2
SHRINK = [
    f"model.depth={DEPTH}", "model.width=32", "model.heads=2", "model.block_size=32",
    "data.vocab_size=512", "data.batch_size=4", "data.val_windows=8", "data.val_batch_size=8",
    "trainer.max_steps=6", "trainer.val_every=3", "trainer.log_every=1", "trainer.progress_bar=false",
    "trainer.accelerator=cpu", "optim.warmup_steps=2",
]


def _train(out, data_dir, *extra, experiment="e2e"):
    args = ["train", str(SPECS / "gpt_tiny.yaml"), "--output-dir", str(out), "--data-dir", str(data_dir),
            "--experiment", experiment]
    for s in [*SHRINK, *extra]:
        args += ["--set", s]
    return main(args)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("train-out")
    assert _train(out, data_dir) == 0
    assert _train(out, data_dir) == 0
    return out


def _client(out):
    from mlflow.tracking import MlflowClient

    from lit_modules.paths import Workspace

    ws = Workspace.resolve(out)
    client = MlflowClient(tracking_uri=ws.tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_run_is_recorded(two_runs):
    client, runs = _client(two_runs)
    assert len(runs) == 2
    run = runs[0]
    assert run.info.status == "FINISHED"
    p, tags = run.data.params, run.data.tags
    assert p["model.depth"] == str(DEPTH) and p["masking.p_bw"] == "0.5" and p["seed"] == "0"
    assert "wiki.valid.raw" in " ".join(p.values()) and "wiki.test.raw" in " ".join(p.values())
    for tag in ("masklab.git_commit", "masklab.config_hash", "masklab.seed", "masklab.device"):
        assert tag in tags, tag
    assert any(k.startswith("masklab.version.torch") or "torch" in k for k in tags)

    for name in ("val/fw_loss", "val/bw_loss", "val/fw_acc", "val/bw_acc", "train/fw_loss", "train/bw_steps"):
        hist = client.get_metric_history(run.info.run_id, name)
        assert hist, f"no {name}"
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/fw_loss")]
    assert len(val_steps) == 2  # validations at steps 3 and 6

    for name in ("ablation/fw_loss", "ablation/bw_loss", "ablation/fw_acc", "ablation/bw_acc"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert steps == list(range(DEPTH + 1)), (name, steps)
    assert len(client.get_metric_history(run.info.run_id, "ablation/block_influence")) == DEPTH

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ablation.csv", "resolved_config.yaml", "gpt_tiny.yaml"} <= artifacts


def test_every_run_logs_its_throughput(two_runs):
    """perf/* once per logging window (log_every 1: steps 1-5), then the run's figure
    (windows after the first) at the final step; the peak it is measured against."""
    client, runs = _client(two_runs)
    run = runs[0]
    for name in ("perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "perf/data_wait", "perf/step_s"):
        hist = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2, 3, 4, 5, 6], name
        assert all(m.value > 0 or name == "perf/data_wait" for m in hist), name
    last = {k: v for k, v in run.data.metrics.items() if k.startswith("perf/")}
    assert 0 <= last["perf/data_wait"] < 1 and 0 < last["perf/mfu"] < 1
    # 4 rows of 32 tokens a step: tokens per second is 32x the samples per second.
    assert last["perf/tokens_per_s"] == pytest.approx(32 * last["perf/samples_per_s"])
    assert run.data.params["perf.peak_source"].startswith("CPU fp32 GEMM")
    assert float(run.data.params["perf.peak_flops"]) > 1e9


def test_same_config_same_seed_same_val_loss(two_runs):
    client, runs = _client(two_runs)
    a, b = (client.get_metric_history(r.info.run_id, "val/fw_loss") for r in runs)
    assert [m.value for m in a] == [m.value for m in b]


def test_ablation_at_zero_removed_equals_final_validation(two_runs):
    client, runs = _client(two_runs)
    run = runs[0]
    final = run.data.metrics["val/fw_loss"]
    k0 = [m.value for m in client.get_metric_history(run.info.run_id, "ablation/fw_loss") if m.step == 0][0]
    assert k0 == pytest.approx(final, rel=1e-4)


def test_checkpoint_loads(two_runs):
    from lit_modules.gpt import LitGPT

    ckpts = sorted(two_runs.rglob("last.ckpt"))
    assert ckpts
    model = LitGPT.load_from_checkpoint(ckpts[0])
    assert len(model.model.blocks) == DEPTH


def test_bad_input_creates_no_run(tmp_path, data_dir, capsys):
    """A bad value is one line on stderr, exit code 2, nothing recorded."""
    assert _train(tmp_path, data_dir, "masking.p_bw=2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "masking.p_bw" in err and "2" in err
    assert _train(tmp_path, tmp_path / "no-data") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wiki.valid.raw" in err
    from mlflow.tracking import MlflowClient

    from lit_modules.paths import Workspace

    client = MlflowClient(tracking_uri=Workspace.resolve(tmp_path).tracking_uri)
    exp = client.get_experiment_by_name("e2e")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_list_command(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gpt" in out and "causal-lm" in out and "wikitext-2" in out and "gpt_tiny " in out and "gpt_pbw_demo " in out
