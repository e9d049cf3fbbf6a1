"""Run configuration: YAML on disk -> frozen dataclasses inside -> plain dicts at the
Lightning / MLflow boundary.

A run config has the sections ``data``, ``model``, ``masking``, ``optim``, ``trainer``
and a top-level ``seed``; the optional ``attention`` and ``transfer`` sections appear in
the dict form (and the hash) only when they differ from their defaults. ``data``, ``model`` and ``masking`` carry a ``name`` that picks
their dataclass from the registries; every other key must be a field of that dataclass.
Unknown keys and wrong types are errors naming the key (and the file).
Dataclass defaults are tiny (seconds on a CPU); real sizes live in the specs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from .config_errors import ConfigError

if TYPE_CHECKING:
    from .data.configs import DataConfig
    from .masking import MaskingStrategy
    from .model_configs import ModelConfig

SECTIONS = ("data", "model", "masking", "optim", "trainer")
# Fields added after configs were first hashed: in the dict form (and the hash) only when
# they differ from these defaults, so every earlier config keeps its hash.
LATE_FIELDS = {("data", "num_workers"): "auto", ("data", "prefetch_factor"): 2, ("data", "cache_limit_gb"): 16.0,
               ("trainer", "compile"): False}
# How a run executes, not what it computes: never in the hash. The batches and masks are
# the same whatever the workers (tests/test_gpu_ready.py); a compiled model computes the
# same losses to rounding.
EXECUTION_FIELDS = (("data", "num_workers"), ("data", "prefetch_factor"), ("trainer", "compile"))
OPTIONAL_SECTIONS = ("attention", "transfer")  # in the dict form (and the hash) only when they do something


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 10
    # Cosine decay to 10% of the peak rate (the nanoGPT / Chinchilla default).
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError("lr", self.lr, "must be > 0")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", self.warmup_steps, "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 60
    val_every: int = 30
    log_every: int = 10
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int = 1
    # "auto": bf16-mixed on a CUDA device that supports it, else 32-true.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    progress_bar: bool = True
    checkpoint: bool = True
    # > 0: training ends at the first step whose cumulative train/flops reach it (the
    # learning-rate schedule still spans max_steps: set max_steps to about the budget's steps).
    flops_budget: float = 0.0
    # Wrap the model's blocks in torch.compile (inductor). Pays on GPUs at realistic
    # sizes; on a CPU the compile costs more than it saves (README: "GPU clusters").
    compile: bool = False

    def __post_init__(self):
        if self.max_steps < 1:
            raise ConfigError("max_steps", self.max_steps, "must be an integer >= 1")
        if self.val_every < 1:
            raise ConfigError("val_every", self.val_every, "must be an integer >= 1")
        if self.log_every < 1:
            raise ConfigError("log_every", self.log_every, "must be an integer >= 1")
        if self.devices < 1:
            raise ConfigError("devices", self.devices, "must be an integer >= 1")
        if self.flops_budget < 0:
            raise ConfigError("flops_budget", self.flops_budget, "must be >= 0 (0: no budget, max_steps ends training)")


@dataclass(frozen=True)
class TransferConfig:
    """What the representations are worth on labelled tasks, measured after training
    (see ``lit_modules/transfer``): a linear probe on frozen features of every layer,
    optionally a fine-tune of the whole encoder, against three baselines."""

    # Task names (lit_modules/transfer/tasks.py); none = no transfer stage.
    tasks: tuple[str, ...] = ()
    # Feature kinds, the first is the primary one (``transfer/<task>/probe_acc``); empty =
    # the family's default list (GPT: fw, bw, fw_bw; BERT: mean, cls; MAE: mean, cls; video: mean).
    features: tuple[str, ...] = ()
    max_train: int = 2000  # rows of each task used to fit a probe (hash-uniform subset)
    max_select: int = 500  # held-out training rows that choose the probe's weight decay
    max_eval: int = 1000  # evaluation rows (disjoint from both by content)
    max_tokens: int = 64  # text rows are cut to this many tokens (and the model's block size)
    batch_size: int = 64  # rows per feature-extraction batch
    baselines: bool = True  # majority class, TF-IDF / raw pixels, the architecture at random init
    finetune_steps: int = 0  # > 0: also fine-tune the whole encoder with a linear head
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 32

    def __post_init__(self):
        from .transfer.names import TASK_INPUT_KIND

        for i, t in enumerate(self.tasks):
            if t not in TASK_INPUT_KIND:
                raise ConfigError(f"tasks[{i}]", t, f"allowed: {', '.join(TASK_INPUT_KIND)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks", list(self.tasks), "lists a task twice")
        for name in ("max_train", "max_select", "max_eval", "max_tokens", "batch_size", "finetune_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be an integer >= 1")
        if self.finetune_steps < 0:
            raise ConfigError("finetune_steps", self.finetune_steps, "must be >= 0 (0: probe only)")
        if not self.finetune_lr > 0:
            raise ConfigError("finetune_lr", self.finetune_lr, "must be > 0")


ATTENTION_KINDS = ("full", "sliding", "longformer", "bigbird", "prefix")


@dataclass(frozen=True)
class AttentionConfig:
    """Which keys each query of a token model may attend (the rules, in reading order, are
    in ``lit_modules/masking/attention.py``; the kernels in ``lit_modules/sparse_attention.py``).

    kind:           full | sliding (|q - k| <= window) | longformer (sliding + global
                    tokens) | bigbird (longformer + random key blocks) | prefix (GPT's
                    prefix-LM: the first ``prefix`` tokens see each other, the rest causal).
                    Causal models AND the pattern with causal attention in their reading
                    order, so GPT's backward direction gets the mirror pattern.
    window:         one-sided width: a query sees keys at most ``window`` positions away.
    global_tokens:  the leading tokens (e.g. ``[CLS]``) that attend to every token and are
                    attended by every token (longformer, bigbird; -1 = 1 for those, 0 else).
    random_blocks:  bigbird: key blocks of ``block_size`` tokens each query block also reads,
                    drawn per layer from the counter-based hash of (seed, layer).
    block_size:     bigbird's block, and the tile of the block-sparse CPU kernel.
    prefix:         prefix: the bidirectional prefix length (its positions are not scored:
                    their next token is visible to them).
    kernel:         auto (flex_attention on CUDA, the block-sparse kernel where it computes
                    fewer pairs than dense, else SDPA with a cached boolean mask) | flex |
                    blocks | dense.
    """

    kind: Literal["full", "sliding", "longformer", "bigbird", "prefix"] = "full"
    window: int = 16
    global_tokens: int = -1
    random_blocks: int = 2
    block_size: int = 16
    prefix: int = 0
    kernel: Literal["auto", "flex", "blocks", "dense"] = "auto"

    def __post_init__(self):
        if self.global_tokens == -1:  # resolved, so the hash and the params say what ran
            object.__setattr__(self, "global_tokens", 1 if self.kind in ("longformer", "bigbird") else 0)
        if self.window < 0:
            raise ConfigError("window", self.window, "must be an integer >= 0 (one-sided width)")
        if self.global_tokens < 0:
            raise ConfigError("global_tokens", self.global_tokens, "must be an integer >= 0 (-1: the kind's default)")
        if self.global_tokens and self.kind not in ("longformer", "bigbird"):
            raise ConfigError("global_tokens", self.global_tokens,
                              f"only longformer and bigbird have global tokens (kind is {self.kind})")
        if self.kind == "longformer" and self.global_tokens < 1:
            raise ConfigError("global_tokens", self.global_tokens, "longformer needs >= 1 (0 is kind sliding)")
        if self.random_blocks < 0:
            raise ConfigError("random_blocks", self.random_blocks, "must be an integer >= 0")
        if self.block_size < 1:
            raise ConfigError("block_size", self.block_size, "must be an integer >= 1")
        if self.kind == "prefix" and self.prefix < 1:
            raise ConfigError("prefix", self.prefix, "kind prefix needs a prefix length >= 1")
        if self.kind != "prefix" and self.prefix:
            raise ConfigError("prefix", self.prefix, f"only kind prefix has a prefix (kind is {self.kind})")


@dataclass(frozen=True)
class AblationOptions:
    """Which layer-removal variants a run evaluates (see lit_modules/ablation.py); a
    study spec's ``ablation:`` section."""

    truncate: bool = True
    drop_one: bool = True
    similarity: bool = True  # block influence and angular distance
    max_batches: int = 0  # 0 = the whole validation set


@dataclass(frozen=True)
class RunConfig:
    """A run: its sections, each a frozen dataclass chosen by name from a registry (data
    and model configs in ``data/configs.py`` and ``model_configs.py``; a masking section
    is the strategy itself)."""

    data: DataConfig
    model: ModelConfig
    masking: MaskingStrategy
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    transfer: TransferConfig = field(default_factory=TransferConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (the form saved in checkpoints and logged to MLflow)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["seed"] = self.seed
        if self.attention != AttentionConfig():  # full attention keeps the config (and hash) it had before
            out["attention"] = dataclasses.asdict(self.attention)
        if self.transfer.tasks:  # a run without transfer keeps the config (and hash) it had before
            out["transfer"] = dataclasses.asdict(self.transfer)
        for (section, key), default in LATE_FIELDS.items():
            if key in out[section] and out[section][key] == default:
                del out[section][key]
        return out

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def hash(self) -> str:
        d = self.to_dict()
        for section, key in EXECUTION_FIELDS:
            d[section].pop(key, None)
        return config_hash(d)


# ---------------------------------------------------------------- loading


class _SafeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only: no tags that build objects) with
    YAML 1.2's rule for floats, so ``1e-3`` is a number as researchers write it. PyYAML
    follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is a string."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str) -> Any:
    """Parse YAML text as plain data (the safe loader, YAML 1.2 floats)."""
    return yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: no object construction


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", str(path), "file not found")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError("config", str(path), f"is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "must be a YAML mapping of sections")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.depth=4"`` -> ("model.depth", 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError("--set", text, "must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: Sequence[str | tuple[str, Any]]) -> dict:
    """Set dotted keys in a nested dict (a deep copy); creates sections as needed."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), nxt, f"is not a section; cannot set {key}")
            node = nxt
        node[parts[-1]] = value
    return out


def run_config_from_dict(data: Mapping, source: str | None = None) -> RunConfig:
    """Validate a nested dict into a RunConfig; errors name the dotted key and the file."""
    from .registry import DATASETS, MASKINGS, MODELS

    try:
        unknown = sorted(set(data) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"seed"})
        if unknown:
            allowed = ", ".join(("seed", *SECTIONS, *OPTIONAL_SECTIONS))
            raise ConfigError(unknown[0], data[unknown[0]], f"unknown key (allowed: {allowed})")
        seed = check_type(data.get("seed", 0), int, "seed")
        sections: dict[str, Any] = {}
        for name, registry in (("data", DATASETS), ("model", MODELS), ("masking", MASKINGS)):
            section = data.get(name)
            if not isinstance(section, Mapping) or "name" not in section:
                raise ConfigError(f"{name}.name", None, f"required; allowed: {', '.join(registry.names())}")
            sections[name] = from_dict(registry.config(section["name"], f"{name}.name"), section, name)
        model_entry = type(sections["model"])  # its config says what the family trains on
        if type(sections["masking"]).accepts is not model_entry.consumes:
            from .masking.batches import kind_name
            from .model_configs import maskings_for

            raise ConfigError(
                "masking.name", sections["masking"].name,
                f"model {sections['model'].name} consumes {kind_name(model_entry.consumes)}; the maskings that "
                f"accept them: {', '.join(maskings_for(model_entry.consumes))}",
            )
        if sections["data"].kind not in model_entry.data_kinds:
            raise ConfigError(
                "data.name", sections["data"].name,
                f"model {sections['model'].name} trains on {', '.join(model_entry.data_kinds)} data",
            )
        optim = from_dict(OptimConfig, data.get("optim") or {}, "optim")
        trainer = from_dict(TrainerConfig, data.get("trainer") or {}, "trainer")
        transfer = from_dict(TransferConfig, data.get("transfer") or {}, "transfer")
        check_transfer_fits(transfer, model_entry)
        attention = from_dict(AttentionConfig, data.get("attention") or {}, "attention")
        check_attention_fits(attention, sections["model"])
        return RunConfig(seed=seed, optim=optim, trainer=trainer, transfer=transfer, attention=attention, **sections)
    except ConfigError as e:
        raise e.within(source=source) from None


def check_transfer_fits(transfer: TransferConfig, model_entry: type) -> None:
    """The tasks read what the model takes and the features are the family's."""
    from .transfer.names import TASK_INPUT_KIND

    takes = getattr(model_entry, "transfer_input", "")
    for i, task in enumerate(transfer.tasks):
        if TASK_INPUT_KIND[task] != takes:
            fits = [t for t, kind in TASK_INPUT_KIND.items() if kind == takes] if takes else []
            raise ConfigError(f"transfer.tasks[{i}]", task,
                              f"reads {TASK_INPUT_KIND[task]} inputs and model {model_entry.name} takes "
                              f"{takes or 'none'}; allowed: {', '.join(fits) or 'no transfer task'}")
    have = getattr(model_entry, "transfer_features", ())
    for i, feature in enumerate(transfer.features):
        if feature not in have:
            raise ConfigError(f"transfer.features[{i}]", feature,
                              f"allowed for model {model_entry.name}: {', '.join(have) or 'none'}")


def check_attention_fits(attention: AttentionConfig, model) -> None:
    """The family supports the kind, and the pattern fits its sequences."""
    kinds = getattr(type(model), "attention_kinds", ("full",))
    if attention.kind not in kinds:
        raise ConfigError("attention.kind", attention.kind, f"allowed for model {model.name}: {', '.join(kinds)}")
    t = getattr(model, "block_size", 0)
    if attention.kind == "prefix" and attention.prefix >= t:
        raise ConfigError("attention.prefix", attention.prefix, f"must be < model.block_size ({t}): "
                          "the positions after the prefix are the ones scored")
    if attention.kind in ("longformer", "bigbird") and attention.global_tokens >= t:
        raise ConfigError("attention.global_tokens", attention.global_tokens,
                          f"must be < model.block_size ({t})")


def load_run_config(
    source: str | Path | Mapping, overrides: Sequence[str | tuple[str, Any]] = ()
) -> RunConfig:
    """A RunConfig from a YAML file or a dict, with ``--set``-style overrides applied."""
    if isinstance(source, Mapping):
        data, where = dict(source), None
    else:
        data, where = load_yaml(source), str(source)
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as e:
        raise e.within(source=where) from None
    return run_config_from_dict(data, where)


# ---------------------------------------------------------------- strict dataclass parsing


def from_dict(cls: type, data: Mapping, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys and wrong types are errors.

    Errors raised in ``__post_init__`` get the section ``prefix`` added to their field.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, data, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", data[unknown[0]], f"unknown key (allowed: {', '.join(names)})")
    kwargs = {k: check_type(v, hints[k], f"{prefix}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.within(prefix) from None


def check_type(value: Any, tp: Any, field_name: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) a YAML value against ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) or not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(field_name, value, f"allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, field_name)
            except ConfigError:
                continue
        raise ConfigError(field_name, value, f"must be {_describe(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field_name, value, f"must be a list of {_type_name(typing.get_args(tp)[0])}")
        inner = typing.get_args(tp)[0]
        return tuple(check_type(v, inner, f"{field_name}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field_name, value, "must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field_name, value, "must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(field_name, value, "must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(field_name, value, "must be a string")
        return value
    return value


def _describe(tp: Any) -> str:
    """What a value of type ``tp`` may be, in words: ``an integer or auto``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return words.get(tp, _type_name(tp))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------- dict helpers


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 4}} -> {"model.depth": 4} (tuples become lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_hash(d: Mapping) -> str:
    """Stable 16-hex-digit hash of a config dict (key order does not matter)."""
    blob = json.dumps(d, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
