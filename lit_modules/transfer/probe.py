"""Linear probes on frozen features: how much of a label a linear read-out recovers.

Three splits, disjoint by content: the probe is fit on ``train``, its weight decay is
chosen on ``select`` (held-out training rows) and it is scored once on ``evaluate``.
Features are standardized with the train split's mean and std.

- **class**, at most ``SOFTMAX_MAX_CLASSES`` classes: softmax regression, full-batch
  L-BFGS (scipy's, with the exact gradient, in float64), a weight-decay path from strong
  to weak (each fit warm-starts from the previous one), the decay with the best select
  accuracy kept (ties: the stronger).
- **class** with more classes, **multilabel** and **regression**: closed-form ridge on
  centred targets (one-hot, multi-hot, values) for every penalty of the path from one
  eigendecomposition; classes by argmax, a label set by its top-k scores (k = the number
  of labels the row has), regression scored by R² (mean over outputs).

Everything is deterministic: float64, no random initialization, fixed iteration counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SOFTMAX_MAX_CLASSES = 20
SOFTMAX_PATH = (1e-1, 1e-2, 1e-3, 1e-4)  # penalty on the mean cross-entropy, per weight squared
RIDGE_PATH = (1e3, 1e2, 1e1, 1e0, 1e-1, 1e-2)  # lambda, relative to the number of train rows
MAX_ITER = 100


@dataclass(frozen=True)
class ProbeResult:
    score: float  # accuracy on the evaluation rows (R² for regression)
    select_score: float  # the same on the select rows, at the chosen penalty
    penalty: float  # the weight decay (or ridge lambda) chosen on the select rows
    kind: str  # "softmax" or "ridge"


def as_tensor(x) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()


def fit_probe(train_x, train_y, select_x, select_y, eval_x, eval_y, target: str, num_outputs: int) -> ProbeResult:
    """Fit on train, choose the penalty on select, score on eval (see the module doc)."""
    xt, xs, xe = as_tensor(train_x), as_tensor(select_x), as_tensor(eval_x)
    mean, std = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt, xs, xe = (xt - mean) / std, (xs - mean) / std, (xe - mean) / std
    if target == "class" and num_outputs <= SOFTMAX_MAX_CLASSES:
        yt, ys, ye = (torch.as_tensor(np.asarray(y)).long() for y in (train_y, select_y, eval_y))
        return _softmax_path(xt, yt, xs, ys, xe, ye, num_outputs)
    return _ridge_path(xt, train_y, xs, select_y, xe, eval_y, target, num_outputs)


# ---------------------------------------------------------------- softmax regression


def _softmax_path(xt, yt, xs, ys, xe, ye, k: int) -> ProbeResult:
    x, y = xt.numpy(), yt.numpy()
    d = x.shape[1]
    theta = np.zeros((d + 1) * k)
    best = None
    for penalty in SOFTMAX_PATH:
        theta = _lbfgs(theta, x, y, k, penalty)
        w, b = torch.from_numpy(theta[: d * k].reshape(d, k)), torch.from_numpy(theta[d * k:])
        sel = _accuracy(xs @ w + b, ys)
        if best is None or sel > best[0]:
            best = (sel, penalty, _accuracy(xe @ w + b, ye))
    sel, penalty, score = best
    return ProbeResult(score, sel, penalty, "softmax")


def _lbfgs(theta: np.ndarray, x: np.ndarray, y: np.ndarray, k: int, penalty: float) -> np.ndarray:
    """Minimize mean cross-entropy + penalty * |W|^2 from ``theta`` = [W (d x k), b]."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    n, d = x.shape
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0

    def loss_grad(t: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = t[: d * k].reshape(d, k), t[d * k:]
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        g = (np.exp(logp) - onehot) / n  # d loss / d logits
        loss = -(logp * onehot).sum() / n + penalty * (w * w).sum()
        return loss, np.concatenate([(x.T @ g + 2 * penalty * w).ravel(), g.sum(0)])

    # One BLAS thread: these matrices are small, and a threaded BLAS beside torch's
    # threads was 10x slower on a 2-core machine (also one fixed reduction order).
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(loss_grad, theta, jac=True, method="L-BFGS-B",
                       options={"maxiter": MAX_ITER, "gtol": 1e-8, "ftol": 1e-12})
    return res.x


def _accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


# ---------------------------------------------------------------- ridge


def _targets(y, target: str, k: int) -> Tensor:
    y = np.asarray(y)
    if target == "class":
        return F.one_hot(torch.as_tensor(y).long(), k).double()
    return torch.as_tensor(y).double().reshape(len(y), -1)


def score(pred: Tensor, y, target: str) -> float:
    """Accuracy (class: argmax; multilabel: the top-k set equals the row's k labels) or R²."""
    y = np.asarray(y)
    if target == "class":
        return float((pred.argmax(1).numpy() == y).mean())
    if target == "multilabel":
        yt = torch.as_tensor(y).double()
        k = yt.sum(1).long()
        order = pred.argsort(1, descending=True)
        chosen = torch.zeros_like(yt)
        ranks = torch.arange(pred.shape[1]).expand_as(pred)
        chosen.scatter_(1, order, (ranks < k[:, None]).double())
        return float((chosen == yt).all(1).double().mean())
    return r2(pred, torch.as_tensor(y).double().reshape(len(y), -1))


def r2(pred: Tensor, y: Tensor) -> float:
    """R², averaged over outputs (scikit-learn's ``uniform_average``)."""
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0).clamp(min=1e-12)
    return float((1 - ss_res / ss_tot).mean())


def _ridge_path(xt, train_y, xs, select_y, xe, eval_y, target: str, k: int) -> ProbeResult:
    yt = _targets(train_y, target, k)
    y_mean = yt.mean(0)
    yc = yt - y_mean
    n, d = xt.shape
    if d <= n:  # primal: eigendecomposition of X^T X (d x d)
        evals, evecs = torch.linalg.eigh(xt.T @ xt)
        proj = evecs.T @ (xt.T @ yc)  # (d, k)

        def weights(lam: float) -> Tensor:
            return evecs @ (proj / (evals + lam * n)[:, None])
    else:  # dual: eigendecomposition of X X^T (n x n)
        evals, evecs = torch.linalg.eigh(xt @ xt.T)
        proj = evecs.T @ yc

        def weights(lam: float) -> Tensor:
            return xt.T @ (evecs @ (proj / (evals + lam * n)[:, None]))
    best = None
    for lam in RIDGE_PATH:
        w = weights(lam)
        sel = score(xs @ w + y_mean, select_y, target)
        if best is None or sel > best[0]:
            best = (sel, lam, score(xe @ w + y_mean, eval_y, target))
    sel, lam, s = best
    return ProbeResult(s, sel, lam, "ridge")
