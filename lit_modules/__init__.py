"""Everything that trains: masking, blocks, model families, data, layer-removal ablation.

Nothing here imports Optuna or MLflow; a trainer hands the modules a Lightning logger.
"""

__version__ = "0.1.0"
