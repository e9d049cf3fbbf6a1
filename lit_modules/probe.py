"""Linear probe on frozen encoder features: how linearly decodable are the labels?

We use a linear probe rather than k-NN because it is the MAE paper's headline measure
of representation quality and it does not depend on the feature scale or a choice of k.
It is softmax regression trained full-batch with L-BFGS on standardized features (mean
and std of the probe's training set) with a small L2 penalty: deterministic, a second
or two on a CPU for a few thousand images. The probe reads the mean of the patch tokens
after the final norm; with blocks removed from the back, after the last kept block.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

L2 = 1e-3  # weight penalty of the softmax regression (on standardized features)
MAX_ITER = 200


def fit_linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int) -> float:
    """Validation accuracy of softmax regression fit on (train_x, train_y)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    w = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    xt64, xv64 = xt.double(), xv.double()
    opt = torch.optim.LBFGS([w, b], max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt64 @ w + b, train_y) + L2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xv64 @ w + b).argmax(1) == val_y).double().mean())


@torch.no_grad()
def _features(model, loader, blocks: list[int]) -> tuple[dict[int, Tensor], Tensor]:
    device = next(model.parameters()).device
    feats: dict[int, list[Tensor]] = {k: [] for k in blocks}
    labels = []
    for batch in loader:
        images = batch.images.to(device)
        for k in blocks:
            feats[k].append(model.features(images, k).float().cpu())
        labels.append(batch.labels.cpu())
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def probe_table(model, datamodule) -> pd.DataFrame:
    """Probe accuracy against encoder blocks removed from the back (tidy rows,
    variant ``truncate``, metric ``probe_acc``)."""
    was_training = model.training
    model.eval()
    try:
        depth = len(model.blocks)
        kept = list(range(depth, -1, -1))  # removed k = depth - kept
        train_loader, val_loader = datamodule.probe_dataloaders()
        tx, ty = _features(model, train_loader, kept)
        vx, vy = _features(model, val_loader, kept)
        rows = []
        for k in kept:
            acc = fit_linear_probe(tx[k], ty, vx[k], vy, datamodule.num_classes)
            rows.append({"variant": "truncate", "removed": depth - k, "block": pd.NA, "metric": "probe_acc",
                         "value": acc})
    finally:
        model.train(was_training)
    df = pd.DataFrame(rows)
    df["removed"] = df["removed"].astype("Int64")
    df["block"] = df["block"].astype("Int64")
    return df
