"""MAE: the encoder sees visible patches only, the loss is on masked patches only,
layer removal matches deleting encoder blocks, probe and reconstructions are logged."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_modules.config_errors import ConfigError
from lit_modules.patchify import patchify, unpatchify

from .conftest import TINY


def _cfg(**changes):
    from lit_modules.config import load_run_config

    return load_run_config(copy.deepcopy(TINY["mae"]), list(changes.items()))


def _model(**changes):
    from lit_modules.run import build_model

    return build_model(_cfg(**changes)).eval()


@pytest.fixture(scope="module")
def dm(tmp_path_factory, data_dir):
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    return build_datamodule(_cfg(), Workspace.resolve(tmp_path_factory.mktemp("mae"), data_dir))


@pytest.fixture(scope="module")
def item(dm):
    """The first validation item: an Images batch (its grid set to the model's) and its
    K evaluation masks, drawn by the validation loader."""
    return next(iter(dm.val_dataloader()))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 8), 8, (4, 4)), x)
    assert torch.equal(patchify(x, 8)[0, 1], x[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))


def test_encoder_sees_visible_patches_only(item):
    model = _model()
    assert item.batch.grid == (4, 4) and len(item.common) == 2
    v = item.common[0]
    assert v.keep_idx.shape[1] == 4  # 16 patches, 75% masked
    with torch.no_grad():
        base = model.model.encode(v.inputs, v.keep_idx)
        images = v.inputs.clone()
        hidden = images.clone()
        for b in range(images.shape[0]):  # scribble over every masked patch
            for i in v.loss_mask[b].nonzero().flatten().tolist():
                r, c = divmod(i, 4)
                hidden[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = torch.randn(3, 8, 8)
        assert torch.allclose(model.model.encode(hidden, v.keep_idx), base, atol=1e-6)
        seen = images.clone()
        r, c = divmod(int(v.keep_idx[0, 0]), 4)
        seen[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
        assert not torch.allclose(model.model.encode(seen, v.keep_idx)[0], base[0])


def test_loss_is_on_masked_patches_only(item):
    model = _model()
    v = item.common[0]
    with torch.no_grad():
        pred = model.model.decode(model.model.encode(v.inputs, v.keep_idx), v.keep_idx)
        target = model.model.target(v.targets)  # (B, N, P) normalized patches
        s, n = model.model.loss_sums(pred, target, v.loss_mask)
        moved = pred.clone()
        moved[~v.loss_mask] += 5.0  # predictions at visible patches do not count
        assert torch.equal(model.model.loss_sums(moved, target, v.loss_mask)[0], s)
        assert torch.equal(model.view_loss(v)[0], s)  # the step's loss is this one
    manual = ((pred - target) ** 2).mean(-1)[v.loss_mask].mean()
    assert float(s / n) == pytest.approx(float(manual), rel=1e-5)


def test_norm_pix_targets():
    model = _model()
    t = model.model.target(torch.randn(2, 3, 32, 32) * 3 + 1)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 16), atol=1e-3)
    raw = _model(**{"model.norm_pix_loss": False}).model.target(torch.ones(1, 3, 32, 32))
    assert torch.equal(raw, torch.ones(1, 16, 192))


def _off_init(model) -> None:
    """Weights well off their init. At init every residual branch is small and the
    decoder's output near zero, so removing a block barely moves the loss and an
    off-by-one in the fast path would hide below any tolerance."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p[0].numel() ** 0.5))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_layer_removal_equals_deleting_encoder_blocks(item):
    from lit_modules.ablation import AblationOptions, layer_removal

    model = _model(**{"model.depth": 3})
    _off_init(model)
    table = layer_removal(model, [item], AblationOptions(drop_one=False))
    fast = table[(table.variant == "truncate") & (table.metric == "recon_loss")].set_index("removed")["value"]
    full = list(model.model.blocks)
    for k in range(4):
        model.model.blocks = torch.nn.ModuleList(full[: 3 - k])
        with torch.no_grad():
            loss, _ = model._shared_step(item, "val")
        assert float(loss) == pytest.approx(float(fast[k]), rel=1e-5, abs=1e-6), k
    model.model.blocks = torch.nn.ModuleList(full)
    # The test has teeth: every truncation depth gives a clearly different loss.
    values = sorted(float(fast[k]) for k in range(4))
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3, values
    assert (table.variant == "block_influence").sum() == 3


def test_image_size_errors(data_dir, tmp_path):
    from lit_modules.paths import Workspace
    from lit_modules.run import build_datamodule

    with pytest.raises(ConfigError) as info:
        _cfg(**{"model.image_size": 36})
    assert "model.image_size" in str(info.value) and "patch_size" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_datamodule(_cfg(**{"model.image_size": 64}), Workspace.resolve(tmp_path, data_dir))
    msg = str(info.value)
    assert "model.image_size" in msg and "image_size 32" in msg and "\n" not in msg


def test_reconstruction_grid(item):
    img = _model().reconstruction_grid(item, n=4)
    assert img.shape == (3, 4 * 32, 4 * 32) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_tracked_run_logs_probe_and_reconstructions(tmp_path, data_dir):
    import yaml
    from mlflow.tracking import MlflowClient

    from lit_modules.paths import Workspace
    from studies.cli import main

    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump(TINY["mae"]))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "out"), "--data-dir", str(data_dir),
                 "--experiment", "mae"]) == 0
    client = MlflowClient(tracking_uri=Workspace.resolve(tmp_path / "out").tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("mae").experiment_id])[0]
    probe = client.get_metric_history(run.info.run_id, "ablation/probe_acc")
    assert sorted(m.step for m in probe) == [0, 1, 2] and all(0 <= m.value <= 1 for m in probe)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "ablation/recon_loss")] != []
    assert "val/probe_acc" in run.data.metrics and "val/recon_loss" in run.data.metrics
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)  # one per validation
