"""Masks made where batches are assembled: a data module's loaders apply the run's
``MaskPlan`` (``masking/plan.py``) to every batch, in DataLoader worker processes when
there are any, so the training and validation steps receive their masks ready.

Without a plan (a loader for a probe, a test or a benchmark) the typed batches pass
through unmasked.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..masking.plan import MaskPlan


class Planned(Dataset):
    """A step-indexed training dataset whose item ``step`` is that step's batch with
    its masks (``TrainItem``)."""

    def __init__(self, base: Dataset, plan: MaskPlan | None):
        self.base, self.plan = base, plan

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, step: int):
        batch = self.base[step]
        return batch if self.plan is None else self.plan.train_item(batch, int(step))


class EvalCollate:
    """A validation loader's collate: assemble the batch (``collate``, or the item itself
    when the dataset yields whole batches), then draw its evaluation masks
    (``EvalItem``)."""

    def __init__(self, plan: MaskPlan | None, collate=None):
        self.plan, self.collate = plan, collate

    def __call__(self, items):
        batch = self.collate(items) if self.collate is not None else items
        return batch if self.plan is None else self.plan.eval_item(batch)
