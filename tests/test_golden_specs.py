"""The four tiny run configs at 20 steps give the validation numbers recorded in
``tests/golden/tiny_specs.json``: a refactor of the masking, data or model code that
leaves the numbers unchanged has not changed what trains. Regenerate deliberately with
``python -m tests.test_golden_specs`` (and say why in the commit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import SPECS

GOLDEN = Path(__file__).parent / "golden" / "tiny_specs.json"
CONFIGS = ("gpt_tiny", "bert_tiny", "mae_tiny", "video_tiny")
STEPS = 20


def validation_numbers(name: str, workspace) -> dict[str, float]:
    """Train ``studies/specs/<name>.yaml`` for 20 steps (one validation at the end, no
    tracking, no checkpoints) and return its val/* metrics."""
    from lit_modules.config import load_run_config
    from lit_modules.run import build_datamodule, build_model, build_trainer

    cfg = load_run_config(SPECS / f"{name}.yaml", [
        ("trainer.max_steps", STEPS), ("trainer.val_every", STEPS), ("trainer.accelerator", "cpu"),
        ("trainer.progress_bar", False), ("trainer.checkpoint", False)])
    trainer = build_trainer(cfg, None, [], None)
    trainer.fit(build_model(cfg), datamodule=build_datamodule(cfg, workspace))
    return {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_config_validation_numbers_are_unchanged(name, workspace):
    want = json.loads(GOLDEN.read_text())[name]
    got = validation_numbers(name, workspace)
    assert set(got) == set(want)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), {k: (got[k], want[k]) for k in want}


if __name__ == "__main__":
    import os

    from lit_modules.paths import Workspace

    ws = Workspace.resolve(os.environ.get("MASKLAB_OUTPUT_DIR", "masklab-runs"), None)
    numbers = {name: validation_numbers(name, ws) for name in CONFIGS}
    GOLDEN.write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
