"""Study specs: YAML -> frozen dataclasses, strict.

A spec names the model and dataset, the run config every trial shares (``fixed``), and
either a ``grid`` (dotted config path -> list of values, times ``replicates`` seeds
0..N-1) or a ``search`` (dotted path -> distribution, ``n_trials``, sampler, pruner)::

    name: gpt_pbw_demo
    model: gpt
    data: wikitext-2
    fixed: {model: {width: 128, ...}, masking: {p_bw: 0.0}, trainer: {max_steps: 300}}
    grid: {model.depth: [2, 4], masking.p_bw: [0.0, 0.05, 0.1]}
    replicates: 2
    objective: {metric: val/fw_loss, direction: minimize}
    ablation: {drop_one: true}

Structural checks need nothing heavy; ``validate_configs`` (the default of
``load_spec``) also builds the run config of every grid point, or of both ends of every
search range, so a path that does not exist in the config or a value the model rejects
is an error before any trial runs. Commands that only read the stores
(``status``, ``report``) load specs with ``validate_configs=False`` and never import
torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lit_modules.config import (
    AblationOptions,
    apply_overrides,
    config_hash,
    load_yaml,
    parse_override,
)
from lit_modules.config_errors import ConfigError
from stores.grid import expand_grid, grid_key

KEYS = ("name", "description", "model", "data", "fixed", "grid", "recipes", "replicates", "baseline", "search",
        "n_trials",
        "sampler", "pruner", "seed", "objective", "ablation")
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("none", "median", "hyperband")
PARAM_TYPES = ("float", "int", "categorical")
SCALARS = (bool, int, float, str)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Objective:
    metric: str = "val/fw_loss"
    direction: str = "minimize"


@dataclass(frozen=True)
class SearchParam:
    path: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()


@dataclass(frozen=True)
class PrunerSpec:
    name: str = "none"
    n_startup_trials: int = 2  # trials that finish before the median pruner prunes anything
    n_warmup_steps: int = 0  # validations of a trial before it can be pruned


@dataclass(frozen=True)
class StudySpec:
    name: str
    model: str
    data: str
    fixed: Mapping[str, Any]
    objective: Objective
    ablation: AblationOptions = AblationOptions()
    grid: Mapping[str, tuple] | None = None
    replicates: int = 1
    # The level each factor's other levels are compared with in the report (default:
    # the first value of its grid list).
    baseline: Mapping[str, Any] | None = None
    search: tuple[SearchParam, ...] = ()
    # Named sets of settings, one level each of the factor ``recipe`` (a grid key):
    # settings that go together, e.g. another model family with its own keys.
    recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    n_trials: int = 0
    sampler: str = "tpe"
    pruner: PrunerSpec = PrunerSpec()
    seed: int = 0
    description: str = ""
    source: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "grid" if self.grid is not None else "search"

    @property
    def swept(self) -> list[str]:
        """The dotted config paths the study varies (replicate seeds not included)."""
        return list(self.grid) if self.grid is not None else [p.path for p in self.search]

    def fixed_hash(self) -> str:
        return config_hash(self.fixed)

    def grid_points(self) -> Iterator[tuple[dict[str, Any], int]]:
        """Every (grid point, replicate seed), in a stable order."""
        assert self.grid is not None
        for point in expand_grid(self.grid):
            for seed in range(self.replicates):
                yield dict(point), seed

    def run_config_dict(self, params: Mapping[str, Any], seed: int | None = None) -> dict:
        """The nested run config of one trial: ``fixed`` with its recipe's settings and
        then ``params`` set."""
        params = dict(params)
        recipe = self.recipes.get(params.pop(RECIPE, None), {})
        data = apply_overrides(dict(self.fixed), [*recipe.items(), *params.items()])
        if seed is not None:
            data["seed"] = seed
        return data

    def to_dict(self) -> dict:
        d = asdict(self)
        d["search"] = [asdict(p) for p in self.search]
        d["grid"] = {k: list(v) for k, v in self.grid.items()} if self.grid is not None else None
        return json.loads(json.dumps(d, default=list))


# ---------------------------------------------------------------- loading


def load_spec(
    source: str | Path | Mapping, overrides: list[str] | tuple[str, ...] = (), *, validate_configs: bool = True
) -> StudySpec:
    """A StudySpec from a YAML file (or dict); ``overrides`` (``--set`` values) apply to
    ``fixed``. Every error is one line naming the field, the value and the file."""
    if isinstance(source, Mapping):
        raw, where = dict(source), None
    else:
        raw, where = load_yaml(source), str(source)
    try:
        spec = _parse(raw, where, tuple(overrides))
        if validate_configs:
            _validate_configs(spec)
    except ConfigError as e:
        raise e.within(source=where) from None
    return spec


def _parse(raw: Mapping, where: str | None, overrides: tuple[str, ...]) -> StudySpec:
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(unknown[0], raw[unknown[0]], f"unknown key (allowed: {', '.join(KEYS)})")
    name = _typed(raw, "name", str, required=True)
    if not _NAME.match(name):
        raise ConfigError("name", name, "letters, digits, '_', '.', '-' only")
    model = _typed(raw, "model", str, required=True)
    data = _typed(raw, "data", str, required=True)
    fixed = _fixed(raw.get("fixed"), model, data, overrides)
    if "recipes" in raw and "search" in raw:
        raise ConfigError("recipes", raw["recipes"], "only for grid: studies (each recipe is a level of the grid)")
    if "recipes" in raw and "grid" not in raw:
        raw = {**raw, "grid": {}}
    if ("grid" in raw) == ("search" in raw):
        raise ConfigError("grid/search", None, "a spec needs exactly one of grid: or search:")
    common = dict(
        name=name, model=model, data=data, fixed=fixed, source=where, overrides=overrides,
        description=_typed(raw, "description", str) or "",
        seed=_typed(raw, "seed", int) or 0,
        objective=_objective(raw.get("objective")),
        ablation=_ablation(raw.get("ablation")),
    )
    if "grid" in raw:
        for key in ("n_trials", "sampler", "pruner"):
            if key in raw:
                raise ConfigError(key, raw[key], "only for search: studies (a grid runs every point)")
        replicates = _typed(raw, "replicates", int)
        replicates = 1 if replicates is None else replicates
        if replicates < 1:
            raise ConfigError("replicates", replicates, "must be an integer >= 1")
        recipes = _recipes(raw.get("recipes"))
        grid = {**({RECIPE: tuple(recipes)} if recipes else {}), **_grid(raw.get("grid") or {}, bool(recipes))}
        spec = StudySpec(grid=grid, replicates=replicates, baseline=_baseline(raw.get("baseline"), grid),
                         recipes=recipes, **common)
    else:
        for key in ("replicates", "baseline"):
            if key in raw:
                raise ConfigError(key, raw[key], "only for grid: studies (a search has no factor levels to compare)")
        if "replicates" in raw:
            raise ConfigError("replicates", raw["replicates"], "only for grid: studies (a search sets fixed.seed)")
        n_trials = _typed(raw, "n_trials", int, required=True)
        if n_trials < 1:
            raise ConfigError("n_trials", n_trials, "must be an integer >= 1")
        sampler = _typed(raw, "sampler", str) or "tpe"
        if sampler not in SAMPLERS:
            raise ConfigError("sampler", sampler, f"allowed: {', '.join(SAMPLERS)}")
        spec = StudySpec(search=_search(raw["search"]), n_trials=n_trials, sampler=sampler,
                         pruner=_pruner(raw.get("pruner")), **common)
    _check_overrides_not_swept(spec)
    return spec


def _check_overrides_not_swept(spec: StudySpec) -> None:
    """A ``--set`` key the grid or search sets would be overwritten in every trial, so
    its value would be silently ignored: an error naming the key and who sets it."""
    for item in spec.overrides:
        key, value = parse_override(item)
        if key == "seed" and spec.grid is not None:
            raise ConfigError(f"--set {key}", value, f"the spec's replicates: {spec.replicates} sets the seed "
                                                     "of every trial (0..N-1); change replicates instead")
        for name, settings in spec.recipes.items():
            if any(path == key or path.startswith(key + ".") for path in settings):
                raise ConfigError(f"--set {key}", value, f"the spec's recipe {name} sets this key; change it there")
        for path in spec.swept:
            if path == key or path.startswith(key + "."):
                if spec.grid is not None:
                    where = f"grid: {path}: [{', '.join(map(str, spec.grid[path]))}]"
                else:
                    where = f"search: {path} ({_describe_search(next(p for p in spec.search if p.path == path))})"
                raise ConfigError(f"--set {key}", value, f"the spec's {where} sets this key in every trial; "
                                                         "change it there, or --set a key the spec does not sweep")


def _describe_search(p: SearchParam) -> str:
    if p.type == "categorical":
        return f"one of {', '.join(map(str, p.choices))}"
    return f"{p.type} in [{p.low:g}, {p.high:g}]{', log' if p.log else ''}"


def _typed(raw: Mapping, key: str, tp: type, required: bool = False, prefix: str = "") -> Any:
    if key not in raw or raw[key] is None:
        if required:
            raise ConfigError(prefix + key, None, f"required ({tp.__name__})")
        return None
    value = raw[key]
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(prefix + key, value, f"must be {'an integer' if tp is int else 'a ' + tp.__name__}")
    return value


def _fixed(fixed: Any, model: str, data: str, overrides: tuple[str, ...]) -> dict:
    if fixed is None:
        fixed = {}
    if not isinstance(fixed, Mapping):
        raise ConfigError("fixed", fixed, "must be a mapping (the run config every trial shares)")
    out = json.loads(json.dumps(fixed))
    for section, name in (("model", model), ("data", data)):
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"fixed.{section}", sec, "must be a mapping")
        if sec.setdefault("name", name) != name:
            raise ConfigError(f"fixed.{section}.name", sec["name"], f"contradicts {section}: {name}")
    try:
        return apply_overrides(out, overrides)
    except ConfigError as e:
        raise e.within("fixed") from None


RECIPE = "recipe"  # the grid factor whose levels are the spec's recipes


def _recipes(raw: Any) -> dict[str, dict[str, Any]]:
    """``recipes: {bert: {model.name: bert}, electra-1/4: {model.name: electra, ...}}``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) < 2:
        raise ConfigError("recipes", raw, "must map at least two names to mappings of dotted config paths to values")
    out = {}
    for name, settings in raw.items():
        if not isinstance(settings, Mapping) or not settings:
            raise ConfigError(f"recipes.{name}", settings, "must map dotted config paths to values")
        for path, value in settings.items():
            if not isinstance(path, str) or "." not in path or not isinstance(value, SCALARS):
                raise ConfigError(f"recipes.{name}.{path}", value, "keys are dotted config paths, values scalars")
        out[str(name)] = dict(settings)
    return out


def _grid(grid: Any, may_be_empty: bool = False) -> dict[str, tuple]:
    if may_be_empty and isinstance(grid, Mapping) and not grid:
        return {}
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("grid", grid, "must map dotted config paths to non-empty lists of values")
    out = {}
    for path, values in grid.items():
        if not isinstance(path, str) or "." not in path and path != "seed":
            raise ConfigError(f"grid.{path}", values, "keys are dotted config paths, e.g. model.depth")
        if path == "seed":
            raise ConfigError("grid.seed", values, "use replicates: N for seeds")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{path}", values, "must be a non-empty list of values")
        for v in values:
            if not isinstance(v, SCALARS):
                raise ConfigError(f"grid.{path}", v, "values must be numbers, strings or booleans")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"grid.{path}", values, "has a repeated value")
        out[path] = tuple(values)
    return out


def _baseline(raw: Any, grid: Mapping[str, tuple]) -> dict[str, Any] | None:
    """``baseline: {masking.p_bw: 0.0}``: a swept path -> one of its grid values."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("baseline", raw, "must map swept paths to one of their grid values")
    for path, value in raw.items():
        if path not in grid:
            raise ConfigError(f"baseline.{path}", value, f"is not swept by grid: (swept: {', '.join(grid)})")
        if not any(v == value for v in grid[path]):
            raise ConfigError(f"baseline.{path}", value, f"must be one of the grid values {list(grid[path])}")
    return dict(raw)


def _search(search: Any) -> tuple[SearchParam, ...]:
    if not isinstance(search, Mapping) or not search:
        raise ConfigError("search", search, "must map dotted config paths to {type, low, high, log, choices}")
    params = []
    allowed = ("type", "low", "high", "log", "step", "choices")
    for path, d in search.items():
        f = f"search.{path}"
        if not isinstance(path, str) or "." not in path:
            raise ConfigError(f, d, "keys are dotted config paths, e.g. optim.lr")
        if not isinstance(d, Mapping):
            raise ConfigError(f, d, "must be a mapping {type, low, high, log, choices}")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ConfigError(f"{f}.{unknown[0]}", d[unknown[0]], f"unknown key (allowed: {', '.join(allowed)})")
        tp = _typed(d, "type", str, required=True, prefix=f + ".")
        if tp not in PARAM_TYPES:
            raise ConfigError(f"{f}.type", tp, f"allowed: {', '.join(PARAM_TYPES)}")
        if tp == "categorical":
            choices = d.get("choices")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, SCALARS) for c in choices):
                raise ConfigError(f"{f}.choices", choices, "must be a non-empty list of numbers, strings or booleans")
            params.append(SearchParam(path, tp, choices=tuple(choices)))
            continue
        num = int if tp == "int" else float
        low = _typed(d, "low", num, required=True, prefix=f + ".")
        high = _typed(d, "high", num, required=True, prefix=f + ".")
        log = bool(_typed(d, "log", bool, prefix=f + "."))
        step = _typed(d, "step", num, prefix=f + ".")
        if not low < high:
            raise ConfigError(f"{f}.low", low, f"must be below high ({high})")
        if log and low <= 0:
            raise ConfigError(f"{f}.low", low, "must be > 0 with log: true")
        if step is not None and (step <= 0 or log):
            raise ConfigError(f"{f}.step", step, "must be > 0, and cannot be combined with log: true")
        params.append(SearchParam(path, tp, low=low, high=high, log=log, step=step))
    return tuple(params)


def _pruner(raw: Any) -> PrunerSpec:
    if raw is None:
        return PrunerSpec()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("pruner", raw, f"must be a name ({', '.join(PRUNERS)}) or a mapping with name:")
    allowed = ("name", "n_startup_trials", "n_warmup_steps")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"pruner.{unknown[0]}", raw[unknown[0]], f"unknown key (allowed: {', '.join(allowed)})")
    name = _typed(raw, "name", str, required=True, prefix="pruner.")
    if name not in PRUNERS:
        raise ConfigError("pruner.name", name, f"allowed: {', '.join(PRUNERS)}")
    kw = {k: _typed(raw, k, int, prefix="pruner.") for k in allowed[1:] if k in raw}
    for k, v in kw.items():
        if v < 0:
            raise ConfigError(f"pruner.{k}", v, "must be >= 0")
    return PrunerSpec(name=name, **kw)


def _objective(raw: Any) -> Objective:
    if raw is None:
        raise ConfigError("objective", None, "required: {metric: val/..., direction: minimize|maximize}")
    if isinstance(raw, str):
        raw = {"metric": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("objective", raw, "must be a mapping {metric, direction}")
    unknown = sorted(set(raw) - {"metric", "direction"})
    if unknown:
        raise ConfigError(f"objective.{unknown[0]}", raw[unknown[0]], "unknown key (allowed: metric, direction)")
    metric = _typed(raw, "metric", str, required=True, prefix="objective.")
    if not metric.startswith(("val/", "transfer/")):
        raise ConfigError("objective.metric", metric, "must be a validation metric (val/...) or a transfer "
                                                      "metric (transfer/<task>/...)")
    direction = _typed(raw, "direction", str, prefix="objective.") or "minimize"
    if direction not in ("minimize", "maximize"):
        raise ConfigError("objective.direction", direction, "allowed: minimize, maximize")
    return Objective(metric, direction)


def _ablation(raw: Any) -> AblationOptions:
    if raw is None:
        return AblationOptions()
    if not isinstance(raw, Mapping):
        raise ConfigError("ablation", raw, "must be a mapping {truncate, drop_one, similarity, max_batches}")
    names = [f.name for f in fields(AblationOptions)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"ablation.{unknown[0]}", raw[unknown[0]], f"unknown key (allowed: {', '.join(names)})")
    kw = {}
    for k in raw:
        tp = int if k == "max_batches" else bool
        kw[k] = _typed(raw, k, tp, prefix="ablation.")
    return AblationOptions(**kw)


# ---------------------------------------------------------------- run-config validation


def _validate_configs(spec: StudySpec) -> None:
    """Build the run config of every grid point (or both ends of every search range)."""
    from lit_modules.config import run_config_from_dict

    known = _known_paths(spec)
    for path in spec.swept:
        if path == RECIPE and spec.recipes:  # its settings are checked with each grid point
            continue
        if path not in known:
            section = "grid" if spec.grid is not None else "search"
            raise ConfigError(f"{section}.{path}", None, "is not a field of the run config "
                              f"(fields: {', '.join(sorted(p for p in known if p.split('.')[0] == path.split('.')[0]))})")
    if spec.grid is not None:
        for point, _ in spec.grid_points():
            _check_point(spec, point, f"grid {grid_key(point)}", run_config_from_dict)
    else:
        for p in spec.search:
            for v in (p.choices or (p.low, p.high)):
                _check_point(spec, {p.path: v}, f"search.{p.path}", run_config_from_dict)


def _check_point(spec: StudySpec, point: Mapping, where: str, build) -> None:
    try:
        cfg = build(spec.run_config_dict(point))
    except ConfigError as e:
        raise ConfigError(e.field, e.value, f"{e.allowed} (at {where})") from None
    _check_transfer_objective(spec, cfg, where)


def _check_transfer_objective(spec: StudySpec, cfg, where: str) -> None:
    """A transfer objective names a task the trials measure, and nothing prunes on it
    (it exists only after training)."""
    metric = spec.objective.metric
    if not metric.startswith("transfer/"):
        return
    task = metric.split("/")[1] if metric.count("/") >= 2 else ""
    if task not in cfg.transfer.tasks:
        raise ConfigError("objective.metric", metric, f"names task {task or '?'} and the trials measure "
                          f"{', '.join(cfg.transfer.tasks) or 'no transfer task'} (fixed.transfer.tasks; at {where})")
    if spec.pruner is not None and spec.pruner.name != "none":
        raise ConfigError("pruner", spec.pruner.name, "prunes on the objective during training and a transfer "
                          "objective exists only after it; use pruner: none")


def _known_paths(spec: StudySpec) -> set[str]:
    """Every dotted path the run config of this spec accepts."""
    from lit_modules.config import AttentionConfig, OptimConfig, TrainerConfig, TransferConfig
    from lit_modules.registry import DATASETS, MASKINGS, MODELS

    paths = {"seed"}
    fixed = spec.fixed
    for section, registry in (("data", DATASETS), ("model", MODELS), ("masking", MASKINGS)):
        name = (fixed.get(section) or {}).get("name")
        if name is None:
            raise ConfigError(f"fixed.{section}.name", None, f"required; allowed: {', '.join(registry.names())}")
        cls = registry.config(name, f"fixed.{section}.name")
        paths |= {f"{section}.{f.name}" for f in fields(cls) if f.init}
    paths |= {f"optim.{f.name}" for f in fields(OptimConfig)}
    paths |= {f"trainer.{f.name}" for f in fields(TrainerConfig)}
    paths |= {f"transfer.{f.name}" for f in fields(TransferConfig)}
    paths |= {f"attention.{f.name}" for f in fields(AttentionConfig)}
    return paths
