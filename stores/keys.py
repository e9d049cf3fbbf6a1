"""Every key masklab writes into the stores, named once.

The runner writes these and the loader reads them: the values are what existing
studies hold, so renaming a constant is free and changing a value orphans every study
already on disk. Optuna study user attributes describe the study; Optuna trial user
attributes describe one attempt at a trial; MLflow run tags describe a run. Several
keys serve on both sides (the failure of a trial is a trial attribute and a run tag).
"""

from __future__ import annotations

PREFIX = "masklab."

# ---------------------------------------------------------------- Optuna study user attributes
SPEC = "masklab.spec"  # the spec as a dict (StudySpec.to_dict)
KIND = "masklab.kind"  # "grid" | "search"; also a tag of the parent run
OBJECTIVE = "masklab.objective"  # the objective metric, e.g. val/fw_loss
DIRECTION = "masklab.direction"  # "minimize" | "maximize"
SWEPT = "masklab.swept"  # the dotted config paths the study varies
FIXED_HASH = "masklab.fixed_hash"  # hash of the spec's fixed config: a resume must match it
OVERRIDES = "masklab.overrides"  # the --set values (a list; space-joined as a run tag)
PARENT_RUN_ID = "masklab.mlflow_parent_run_id"  # the study's MLflow parent run
TRACKING_URI = "masklab.tracking_uri"  # where the study's runs are tracked
REPORTED_TRIALS = "masklab.reported_trials"  # trials the latest report covered

# ---------------------------------------------------------------- Optuna trial user attributes
RUN_ID = "masklab.mlflow_run_id"  # the attempt's MLflow run
NAME = "masklab.name"  # the trial's setting and seed, also its run's name
GRID_KEY = "masklab.grid_key"  # the grid point (stores.grid.grid_key), shared by replicates
REPLICATE = "masklab.replicate"  # the replicate seed of a grid trial
FAILURE = "masklab.failure"  # why the trial failed; also a run tag
CONFIG_HASH = "masklab.config_hash"  # hash of the resolved run config; also a run tag
HOST = "masklab.host"  # the worker's host ...
PID = "masklab.pid"  # ... and process id, to find a dead worker on this host
CHECKPOINT = "masklab.checkpoint"  # the attempt's last checkpoint
RETRY_OF_TRIAL = "masklab.retry_of_trial"  # a retry: the first attempt's trial number; also a run tag
RETRY_OF_RUN = "masklab.retry_of_run"  # a retry: the dead attempt's MLflow run; also a run tag
RESUME_CHECKPOINT = "masklab.resume_checkpoint"  # a retry: the checkpoint it resumes from

# Attributes of one attempt that a retry must not inherit.
ATTEMPT_ATTRS = (HOST, PID, FAILURE, RUN_ID, CHECKPOINT)

# ---------------------------------------------------------------- MLflow run tags
ROLE = "masklab.role"  # ROLE_STUDY for the parent run, ROLE_TRIAL for a trial's run
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
STUDY = "masklab.study"  # the study a run belongs to
TRIAL = "masklab.trial"  # the trial number of a trial's run
SOURCE = "masklab.source"  # the spec or run config file
SEED = "masklab.seed"
MODEL = "masklab.model"
DATASET = "masklab.dataset"
MASKING = "masklab.masking"
DEVICE = "masklab.device"
PRUNED = "masklab.pruned"  # why the pruner stopped the run
INIT_FROM = "masklab.init_from"  # a second stage: the checkpoint it starts from ...
INIT_FROM_RUN = "masklab.init_from_run"  # ... and that checkpoint's run
RESUMED_FROM = "masklab.resumed_from"  # a resumed run: its checkpoint ...
RESUMED_AT_STEP = "masklab.resumed_at_step"  # ... and that checkpoint's step
GIT_COMMIT = "masklab.git_commit"
GIT_DIRTY = "masklab.git_dirty"

# MLflow's own tags that masklab sets and reads.
PARENT_RUN_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The experiment kind that makes the MLflow UI open an experiment on its runs table.
EXPERIMENT_KIND = "custom_model_development"


def trial_runs_filter(study: str) -> str:
    """An MLflow ``search_runs`` filter for the trial runs of ``study`` (by tags: for
    studies whose parent run is not recorded)."""
    return f"tags.`{STUDY}` = '{study}' AND tags.`{ROLE}` = '{ROLE_TRIAL}'"


def child_runs_filter(parent_run_id: str) -> str:
    """An MLflow ``search_runs`` filter for the child runs of a parent run."""
    return f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"
