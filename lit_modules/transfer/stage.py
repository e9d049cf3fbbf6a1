"""The transfer stage of a run: after training and layer removal, for each task of the
run config's ``transfer:`` section,

1. the task's labelled rows (train / select / eval, disjoint by content);
2. the features of every layer from one pass (``features.py``), each feature kind probed
   per layer (``probe.py``): ``transfer/<task>/probe_acc`` (step = layer) for the primary
   feature, ``..._<feature>`` for the others (``probe_r2`` for regression);
3. the baselines, once per task and cached: majority class, the classic one (TF-IDF
   unigrams + bigrams for text, raw pixels for images and clips) and the same
   architecture at random initialization with the same probe (cached per model config
   and seed): ``transfer/<task>/baseline_{majority,tfidf|pixels,random_init}``;
4. optionally a fine-tune of the whole encoder with a linear head for
   ``finetune_steps`` steps: ``transfer/<task>/finetune_acc``.

Tracking-agnostic: returns the metric points and a tidy table; the caller logs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig, config_hash
from .features import batches, layer_features, model_inputs, top_features
from .names import probe_metric, score_name
from .probe import fit_probe, score

COLUMNS = ["task", "feature", "layer", "metric", "value"]


@dataclass
class TransferOutcome:
    points: list[tuple[str, float, int]] = field(default_factory=list)  # (metric, value, step)
    metrics: dict[str, float] = field(default_factory=dict)  # the top layer, baselines, fine-tune
    rows: list[dict] = field(default_factory=list)  # tidy: task, feature, layer, metric, value
    params: dict[str, str] = field(default_factory=dict)  # what each task read
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=COLUMNS)
        df["layer"] = df["layer"].astype("Int64")
        return df


def feature_kinds(cfg: RunConfig) -> tuple[str, ...]:
    """The run's feature kinds, the primary one first."""
    return cfg.transfer.features or type(cfg.model).transfer_features


class Features:
    """The features of a model on a task's inputs, computed once per run: tasks that
    read the same rows (the two Moving-MNIST tasks read the same clips) share them."""

    def __init__(self, cfg: RunConfig, kinds: tuple[str, ...]):
        self.cfg, self.kinds, self.memo = cfg, kinds, {}
        self.fresh = None  # the architecture at random init (the run's seed), built on demand

    def random_init(self, build_model):
        if self.fresh is None:
            self.fresh = build_model(self.cfg)
        return self.fresh

    def __call__(self, model, task, split: str, inputs) -> dict[str, np.ndarray]:
        import hashlib

        keys = np.ascontiguousarray(getattr(task, split).keys, dtype="<i8").tobytes()
        memo_key = (id(model), task.input_kind, hashlib.sha256(keys).hexdigest())
        if memo_key not in self.memo:
            self.memo[memo_key] = layer_features(model, task.input_kind, inputs, self.cfg, self.kinds,
                                                 self.cfg.transfer.batch_size)
        return self.memo[memo_key]


def run_transfer(model, cfg: RunConfig, data_dir: Path, cache_dir: Path, tokenizer: Path | None,
                 build_model: Callable[[RunConfig], nn.Module]) -> TransferOutcome:
    """Every task of ``cfg.transfer`` on ``model`` (see the module doc)."""
    out = TransferOutcome()
    features = Features(cfg, feature_kinds(cfg))
    for name in cfg.transfer.tasks:
        start = time.monotonic()
        _one_task(out, name, model, cfg, data_dir, cache_dir, tokenizer, build_model, features)
        out.seconds[name] = time.monotonic() - start
    return out


def _one_task(out: TransferOutcome, name: str, model, cfg: RunConfig, data_dir: Path, cache_dir: Path,
              tokenizer: Path | None, build_model, features: Features) -> None:
    from .tasks import load_task

    t = cfg.transfer
    task = load_task(name, data_dir, cache_dir, max_train=t.max_train, max_select=t.max_select,
                     max_eval=t.max_eval, image_size=getattr(cfg.model, "image_size", 0),
                     frames=getattr(cfg.model, "frames", 16))
    out.params[f"transfer.{name}.source"] = task.source
    kinds = feature_kinds(cfg)
    inputs = {s: model_inputs(task.input_kind, getattr(task, s).x, cfg, tokenizer, t.max_tokens)
              for s in ("train", "select", "eval")}
    feats = {s: features(model, task, s, inputs[s]) for s in inputs}
    for feature in kinds:
        metric = probe_metric(name, feature, kinds[0])
        for layer in range(feats["train"][feature].shape[0]):
            value = _probe(task, feats, feature, layer)
            out.points.append((metric, value, layer))
            out.rows.append({"task": name, "feature": feature, "layer": layer, "metric": metric, "value": value})
        out.metrics[metric] = value  # the top layer
    extra = {}
    if t.baselines:
        extra.update(_baselines(task, name, cfg, cache_dir, inputs, kinds[0], build_model, features))
    if t.finetune_steps:
        extra[f"transfer/{name}/finetune_{score_name(name)}"] = finetune(model, cfg, task, inputs, kinds[0],
                                                                          build_model)
    for metric, value in extra.items():
        out.points.append((metric, value, 0))
        out.metrics[metric] = value
        out.rows.append({"task": name, "feature": pd.NA, "layer": pd.NA, "metric": metric, "value": value})


def _probe(task, feats: dict, feature: str, layer: int) -> float:
    x = {s: feats[s][feature][layer] for s in feats}
    return fit_probe(x["train"], task.train.y, x["select"], task.select.y, x["eval"], task.eval.y,
                     task.target, task.num_outputs).score


def probe_score(train_x, train_y, select_x, select_y, eval_x, eval_y, target: str, num_outputs: int) -> float:
    return fit_probe(train_x, train_y, select_x, select_y, eval_x, eval_y, target, num_outputs).score


# ---------------------------------------------------------------- baselines


def _baselines(task, name: str, cfg: RunConfig, cache_dir: Path, inputs: dict, primary: str,
               build_model, features: Features) -> dict[str, float]:
    from .baselines import cached, cached_baselines

    t = cfg.transfer
    caps = {"max_train": t.max_train, "max_select": t.max_select, "max_eval": t.max_eval,
            "image_size": getattr(cfg.model, "image_size", 0), "frames": getattr(cfg.model, "frames", 16)}
    key = config_hash({"task": name, "source": task.source, **caps})
    out = {f"transfer/{name}/baseline_{k}": v for k, v in cached_baselines(task, probe_score, cache_dir, key).items()}
    # The architecture at random init: the weights this run started from (same seed), its
    # attention pattern included (a run without an attention section keeps its old key).
    arch = {k: v for k, v in cfg.to_dict().items() if k in ("model", "data", "attention")}
    init_key = config_hash({"task": name, "source": task.source, **arch, "seed": cfg.seed, "feature": primary,
                            "max_tokens": t.max_tokens, **caps})

    def compute() -> dict[str, float]:
        fresh = features.random_init(build_model)
        feats = {s: features(fresh, task, s, inputs[s]) for s in inputs}
        return {"random_init": _probe(task, feats, primary, len(fresh.blocks))}

    out[f"transfer/{name}/baseline_random_init"] = cached(cache_dir, "random-init", init_key, compute)["random_init"]
    return out


# ---------------------------------------------------------------- fine-tuning


def finetune(model, cfg: RunConfig, task, inputs: dict, feature: str, build_model) -> float:
    """A copy of the model fine-tuned with a linear head on the train rows (AdamW at
    ``finetune_lr``, ``finetune_steps`` steps of ``finetune_batch_size`` rows drawn with
    the run's seed), scored on the eval rows."""
    t = cfg.transfer
    net = build_model(cfg)
    net.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    net.to(device).train()
    y_train = _train_targets(task)
    probe_batch = next(batches(task.input_kind, inputs["train"][:1], cfg, 1)).to(device)
    dim = top_features(net, probe_batch, feature).shape[-1]
    head = nn.Linear(dim, y_train.shape[1] if y_train.ndim == 2 else task.num_outputs).to(device)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=t.finetune_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(inputs["train"])
    for _ in range(t.finetune_steps):
        idx = torch.randint(n, (min(t.finetune_batch_size, n),), generator=gen).numpy()
        batch = next(batches(task.input_kind, _take(inputs["train"], idx), cfg, len(idx))).to(device)
        logits = head(top_features(net, batch, feature))
        loss = _loss(logits, torch.as_tensor(y_train[idx]).to(device), task.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*net.parameters(), *head.parameters()], 1.0)
        opt.step()
    net.eval()
    preds = []
    with torch.no_grad():
        for batch in batches(task.input_kind, inputs["eval"], cfg, t.batch_size):
            preds.append(head(top_features(net, batch.to(device), feature)).double().cpu())
    pred = torch.cat(preds)
    if task.target == "regression":
        pred = pred * torch.as_tensor(_y_std(task)) + torch.as_tensor(_y_mean(task))
    return score(pred, task.eval.y, task.target)


def _take(inputs, idx: np.ndarray):
    return [inputs[i] for i in idx] if isinstance(inputs, list) else np.asarray(inputs[idx])


def _y_mean(task) -> np.ndarray:
    return np.asarray(task.train.y, dtype=np.float64).mean(0)


def _y_std(task) -> np.ndarray:
    return np.asarray(task.train.y, dtype=np.float64).std(0).clip(min=1e-6)


def _train_targets(task) -> np.ndarray:
    """Class ids as they are; label sets as multi-hot; regression targets standardized."""
    y = np.asarray(task.train.y)
    if task.target == "regression":
        return ((y - _y_mean(task)) / _y_std(task)).astype(np.float32)
    return y


def _loss(logits: torch.Tensor, y: torch.Tensor, target: str) -> torch.Tensor:
    if target == "class":
        return F.cross_entropy(logits, y.long())
    if target == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.mse_loss(logits, y.float())


# ---------------------------------------------------------------- terminal summary


def summary(table: pd.DataFrame) -> str:
    """Per task: the probe score of each feature kind per layer, then the baselines."""
    from .names import TASK_TARGET

    lines = ["transfer (linear probe on the frozen features of each layer; layer 0 = the embeddings):"]
    for task, rows in table.groupby("task", sort=False):
        probes = rows[rows["layer"].notna()]
        curve = probes.pivot(index="layer", columns="feature", values="value")
        curve = curve[list(dict.fromkeys(probes["feature"]))]  # the primary feature first
        what = "R²" if TASK_TARGET[task] == "regression" else "accuracy"
        lines.append(f"{task} ({what} on its evaluation rows):")
        lines.append(curve.to_string(float_format=lambda v: f"{v:.4f}"))
        others = rows[rows["layer"].isna()]
        if len(others):
            lines.append("  " + ", ".join(f"{m.split('/')[-1]} {v:.4f}" for m, v in zip(others["metric"], others["value"])))
    return "\n".join(lines)
