"""What representations are worth on labelled tasks: tasks, features, probes, baselines,
fine-tuning (see stage.py)."""
