"""One tracked run: train, validate, ablate (layer removal), all recorded in MLflow.

This is where ``lit_modules`` (which knows nothing of MLflow) meets the tracking store:
the run is created here, its provenance recorded, a buffered logger handed to the
Trainer, and the layer-removal table logged as metrics and as a CSV artifact.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from lit_modules.ablation import layer_removal
from lit_modules.config import AblationOptions, RunConfig
from lit_modules.paths import Workspace
from stores import keys

from .spool import ResilientClient, Spool, TrackingOutage
from .tracking import (
    BufferedMLflowLogger,
    artifact_root,
    get_or_create_experiment,
    log_metric_series,
    log_params,
    provenance_tags,
    send_metrics,
    set_tags,
)


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    ablation: pd.DataFrame
    checkpoint: Path | None
    seconds: float
    params: dict[str, object] = field(default_factory=dict)
    transfer: pd.DataFrame | None = None  # tidy probe curves and baselines (lit_modules/transfer/stage.py)


@dataclass(frozen=True)
class Resume:
    """A run that continues an earlier attempt whose worker died: from the attempt's last
    checkpoint when it saved one, in a new MLflow run linked to the attempt's run, whose
    curves up to the checkpoint are copied over so the new run's history is whole."""

    previous_run_id: str | None
    checkpoint: Path | None
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracking:
    """Where and under what a run is recorded."""

    tracking_uri: str
    experiment: str
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    artifacts: Sequence[Path] = ()  # extra files to attach (e.g. the spec)


def ablation_points(df: pd.DataFrame) -> list[tuple[str, float, int]]:
    """The tidy layer-removal table as MLflow metric series.

    truncate:  ablation/{metric} at step = blocks removed from the back;
    drop_one:  ablation/drop_one/{metric} at step = the block removed;
    block_influence, angular distance between consecutive block inputs:
               ablation/{metric} at step = block index.
    """
    points = []
    for row in df.itertuples(index=False):
        if pd.isna(row.value):
            continue
        if row.variant == "truncate":
            points.append((f"ablation/{row.metric}", row.value, int(row.removed)))
        elif row.variant == "drop_one":
            points.append((f"ablation/drop_one/{row.metric}", row.value, int(row.block)))
        elif row.variant == "block_influence":
            points.append(("ablation/block_influence", row.value, int(row.block)))
        elif row.variant == "angular_distance" and row.removed == 1:
            points.append(("ablation/angular_distance", row.value, int(row.block)))
    return points


def ablation_summary(df: pd.DataFrame) -> list[tuple[str, float, int]]:
    """Scalars of the layer-removal curves, for side-by-side comparison of runs (the UI
    shows a series' last step, which for ``ablation/*`` is the model with every block
    removed). For each truncated metric, the change from the intact model:

    ``ablation_delta/{metric}_last_block``: after removing the last block;
    ``ablation_delta/{metric}_per_block``:  per block removed, averaged over all of them
    (the change with every block removed, divided by the number of blocks).
    """
    truncate = df[(df["variant"] == "truncate") & df["value"].notna() & df["removed"].notna()]
    points = []
    for metric, rows in truncate.groupby("metric", sort=True):
        by_removed = dict(zip(rows["removed"].astype(int), rows["value"].astype(float)))
        if 0 not in by_removed or len(by_removed) < 2:
            continue
        intact, most = by_removed[0], max(by_removed)
        if 1 in by_removed:
            points.append((f"ablation_delta/{metric}_last_block", by_removed[1] - intact, 0))
        points.append((f"ablation_delta/{metric}_per_block", (by_removed[most] - intact) / most, 0))
    return points


def train_run(
    cfg: RunConfig,
    workspace: Workspace,
    tracking: Tracking,
    ablation: AblationOptions | None = None,
    callbacks: Sequence = (),
    on_run: Callable[[str], None] | None = None,
    resume: Resume | None = None,
) -> RunResult:
    """Train ``cfg``, validate, ablate; record everything in one MLflow run.

    Data and config errors are raised before the run is created, so a bad input leaves
    nothing half-recorded. Any failure during training marks the run FAILED with the
    reason in the tag ``masklab.failure`` and re-raises.
    """
    start = time.monotonic()
    _quiet_lightning()
    dm, model = _build(cfg, workspace)
    client = ResilientClient(MlflowClient(tracking_uri=tracking.tracking_uri))
    run = _create_run(client, cfg, workspace, tracking, resume)
    try:
        if on_run is not None:
            on_run(run.run_id)
        params = {**cfg.flat(), **dm.info, "model.parameters": sum(p.numel() for p in model.parameters()),
                  **model.run_params()}
        log_params(client, run.run_id, {k: str(v) for k, v in params.items()}, run.logger._params)
        trainer, metrics = _fit(run, cfg, workspace, dm, model, callbacks, tracking.artifacts)
        table = _ablate(run, model, dm, trainer, metrics, ablation or AblationOptions())
        transfer = _transfer(run, model, dm, cfg, workspace, metrics) if cfg.transfer.tasks else None
        run.logger.close()
        checkpoint = _save_last(cfg, trainer, workspace.checkpoint_dir / run.run_id)
        client.set_terminated(run.run_id, "FINISHED")
    except BaseException as e:
        _record_failure(run, e)
        raise
    return RunResult(run.run_id, metrics, table, checkpoint, time.monotonic() - start, params, transfer)


@dataclass(frozen=True)
class _Run:
    """The MLflow run being recorded, and where training starts from."""

    client: MlflowClient
    run_id: str
    logger: BufferedMLflowLogger
    checkpoint: Path | None = None  # the checkpoint a resumed run continues from
    step: int = 0  # ... and its global step
    previous_run_id: str | None = None  # the run of the attempt it resumes


def _build(cfg: RunConfig, workspace: Workspace):
    """The datamodule and the model (with its stage-1 weights, for a second stage)."""
    from lit_modules.run import build_datamodule, build_model

    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    init_from = getattr(cfg.model, "init_from", "")
    if init_from:  # a bad or unsafe stage-1 checkpoint is refused before the run exists
        model.load_pretrained(init_from)
    return dm, model


def _create_run(client: MlflowClient, cfg: RunConfig, workspace: Workspace, tracking: Tracking,
                resume: Resume | None) -> _Run:
    """The run, tagged with what produced it (and, resuming, what it continues)."""
    exp_id = get_or_create_experiment(client, tracking.experiment, artifact_root(tracking.tracking_uri, workspace))
    tags = _provenance(cfg, tracking)
    checkpoint, step = None, 0
    if resume is not None:
        checkpoint, step, resumed = _resume_point(resume)
        tags.update(resumed)
    run_id = client.create_run(exp_id, run_name=tracking.run_name, tags=tags).info.run_id
    spool = Spool(workspace.output_dir, run_id, tracking.tracking_uri)
    return _Run(client, run_id, BufferedMLflowLogger(client, run_id, spool=spool), checkpoint, step,
                resume.previous_run_id if resume is not None else None)


def _provenance(cfg: RunConfig, tracking: Tracking) -> dict[str, str]:
    """The tags of a new run: provenance, the run config's identity, the caller's tags."""
    tags = {
        **provenance_tags(),
        keys.CONFIG_HASH: cfg.hash(),
        keys.SEED: str(cfg.seed),
        keys.MODEL: cfg.model.name,
        keys.DATASET: cfg.data.name,
        keys.MASKING: cfg.masking.name,
        **tracking.tags,
    }
    if tracking.parent_run_id:
        tags[keys.PARENT_RUN_TAG] = tracking.parent_run_id
    init_from = getattr(cfg.model, "init_from", "")
    if init_from:  # a second stage: link the run to the one whose checkpoint it starts from
        tags[keys.INIT_FROM] = str(Path(init_from).resolve())
        tags[keys.INIT_FROM_RUN] = Path(init_from).resolve().parent.name
    return tags


def _resume_point(resume: Resume) -> tuple[Path | None, int, dict[str, str]]:
    """The checkpoint a retry resumes from (None if the attempt saved none), its step,
    and the tags that link the new run to the attempt."""
    tags = dict(resume.tags)
    if resume.previous_run_id:
        tags[keys.RETRY_OF_RUN] = resume.previous_run_id
    if resume.checkpoint is None or not Path(resume.checkpoint).is_file():
        return None, 0, tags
    checkpoint = Path(resume.checkpoint)
    step = checkpoint_step(checkpoint)
    for partial in checkpoint.parent.glob(".*.partial"):  # the attempt died mid-save
        partial.unlink(missing_ok=True)
    tags[keys.RESUMED_FROM] = str(checkpoint.resolve())
    tags[keys.RESUMED_AT_STEP] = str(step)
    return checkpoint, step, tags


def _fit(run: _Run, cfg: RunConfig, workspace: Workspace, dm, model, callbacks: Sequence,
         artifacts: Sequence[Path]):
    """Train (from the resume checkpoint, if any) and validate the final step; returns
    the trainer and the final ``val/*`` metrics."""
    from lit_modules.run import build_trainer

    seen = _ValidatedAt()
    trainer = build_trainer(cfg, run.logger, [*callbacks, seen], workspace.checkpoint_dir / run.run_id)
    set_tags(run.client, run.run_id, {keys.DEVICE: _device_name(trainer.strategy.root_device)})
    _log_config_artifacts(run.client, run.run_id, cfg, artifacts)
    if run.checkpoint is not None and run.previous_run_id:
        copy_history(run.client, run.previous_run_id, run.run_id, run.step)
    try:
        # weights_only: checkpoint_step has already checked the file holds plain data only.
        trainer.fit(model, datamodule=dm, ckpt_path=run.checkpoint, weights_only=True if run.checkpoint else None)
    except SystemExit as e:  # Lightning ends a Ctrl-C'd fit with SystemExit(1)
        raise KeyboardInterrupt("interrupted during training") from e
    if seen.step != trainer.global_step:
        trainer.validate(model, datamodule=dm, verbose=False)  # the final step's val
    from lit_modules.perf import Throughput

    for callback in trainer.callbacks:
        if isinstance(callback, Throughput) and callback.peak_source:
            log_params(run.client, run.run_id, callback.params(), run.logger._params)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return trainer, metrics


def _ablate(run: _Run, model, dm, trainer, metrics: dict[str, float], ablation: AblationOptions) -> pd.DataFrame:
    """Layer removal (and, where the model and data offer one, a linear probe per blocks
    removed), logged as metric series and as the ``ablation.csv`` artifact."""
    table = layer_removal(model, dm.val_dataloader(), ablation)
    if hasattr(dm, "probe_dataloaders") and hasattr(model, "features"):
        # Representation quality: a linear probe on frozen features, per blocks removed.
        from lit_modules.probe import probe_table

        probe = probe_table(model, dm)
        table = pd.concat([table, probe], ignore_index=True)
        metrics["val/probe_acc"] = float(probe.loc[probe.removed == 0, "value"].iloc[0])
        run.client.log_metric(run.run_id, "val/probe_acc", metrics["val/probe_acc"], step=trainer.global_step)
    log_metric_series(run.client, run.run_id, ablation_points(table) + ablation_summary(table))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ablation.csv"
        table.to_csv(path, index=False)
        run.client.log_artifact(run.run_id, str(path))
    return table


def _transfer(run: _Run, model, dm, cfg: RunConfig, workspace: Workspace, metrics: dict[str, float]) -> pd.DataFrame:
    """What the representations are worth on the labelled tasks (lit_modules/transfer):
    probe curves per layer, baselines, fine-tune; metrics, params and ``transfer.csv``."""
    from lit_modules.run import build_model
    from lit_modules.transfer.stage import run_transfer

    outcome = run_transfer(model, cfg, workspace.data_dir, workspace.cache_dir,
                           getattr(dm, "tokenizer_path", None), build_model)
    log_metric_series(run.client, run.run_id, outcome.points)
    log_params(run.client, run.run_id, {**outcome.params, **{f"transfer.{k}.seconds": f"{v:.1f}"
                                                             for k, v in outcome.seconds.items()}})
    metrics.update(outcome.metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "transfer.csv"
        outcome.table().to_csv(path, index=False)
        run.client.log_artifact(run.run_id, str(path))
    return outcome.table()


def _save_last(cfg: RunConfig, trainer, ckpt_dir: Path) -> Path | None:
    """The weights after the last step (the callback saves only at validations)."""
    if not cfg.trainer.checkpoint:
        return None
    import os

    from lit_modules.run import CheckpointWriteError, discard_partial, ensure_written

    checkpoint = ckpt_dir / "last.ckpt"
    partial = ckpt_dir / f".last.ckpt.{os.getpid()}.final.partial"
    try:  # written aside and renamed over: a failed write leaves the previous checkpoint whole
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(partial, weights_only=False)  # saving: False keeps the optimizer state
        ensure_written(partial)
        os.replace(partial, checkpoint)
    except OSError as e:
        discard_partial(partial)
        kept = f"the previous checkpoint {checkpoint} is kept" if checkpoint.exists() else "no earlier checkpoint"
        raise CheckpointWriteError(f"cannot write the final checkpoint to {e.filename or partial}: "
                                   f"{e.strerror or e}; {kept}") from None
    return checkpoint


def _record_failure(run: _Run, e: BaseException) -> None:
    """Mark the run FAILED (KILLED when interrupted or pruned), the reason as a tag; with
    the tracking server gone, both go to the run's spool for ``masklab sync``."""
    try:
        run.logger.close()
    except Exception:  # noqa: BLE001 - the training error is the one to report
        pass
    from stores.urls import scrub

    # A library's message may quote a store URL: recorded without its password.
    reason = scrub(f"{type(e).__name__}: {e}").splitlines()[0][:5000] if str(e) else type(e).__name__
    pruned = type(e).__name__ == "TrialPruned"  # optuna's, raised by the pruning callback
    tags = {keys.PRUNED if pruned else keys.FAILURE: reason}
    status = "KILLED" if isinstance(e, KeyboardInterrupt) or pruned else "FAILED"
    try:
        set_tags(run.client, run.run_id, tags)
        run.client.set_terminated(run.run_id, status)
    except TrackingOutage:
        spool = run.logger.spool
        if spool is None:
            raise
        spool.tags(tags)
        spool.terminated(status)


def checkpoint_step(path: Path) -> int:
    """The global step a Lightning checkpoint was saved at (memory-mapped: the tensors
    are not read, ``fit`` loads them once). An unsafe file is a ConfigError."""
    from lit_modules.checkpoints import load_checkpoint

    return int(load_checkpoint(path, "resume checkpoint", mmap=True).get("global_step", 0))


def copy_history(client, source_run: str, target_run: str, before_step: int) -> int:
    """Copy the ``train/*`` and ``val/*`` points of ``source_run`` logged before global
    step ``before_step`` (a checkpoint's step: what the resumed run does not repeat) into
    ``target_run``, so a resumed run continues the curves of the attempt it resumes."""
    points = []
    for key in client.get_run(source_run).data.metrics:
        if key.startswith(("train/", "val/")):
            points += [m for m in client.get_metric_history(source_run, key) if m.step < before_step]
    send_metrics(client, target_run, points)
    return len(points)


def _quiet_lightning() -> None:
    """Keep Lightning's per-run banners (device lists, tips, "max_steps reached") out of
    the console: the device is recorded as a tag, and a study prints one line per trial."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _ValidatedAt(Callback):
    """Remembers the global step of the last validation."""

    step = -1

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _log_config_artifacts(client, run_id: str, cfg: RunConfig, extra: Sequence[Path]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "resolved_config.yaml"
        resolved.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), sort_keys=False))
        client.log_artifact(run_id, str(resolved))
    for path in extra:
        client.log_artifact(run_id, str(path))
