"""The ``masklab`` command line.

Heavy modules (torch, Lightning, MLflow) are imported inside the commands that need
them, so commands that only read stores start in about a second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parent / "specs"


def _workspace(args):
    from lit_modules.paths import Workspace

    return Workspace.resolve(getattr(args, "output_dir", None), getattr(args, "data_dir", None))


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
    p.add_argument("--data-dir", help="where data files are found (default $MASKLAB_DATA_DIR or ./data)")


def cmd_train(args) -> int:
    from lit_modules.ablation import truncation_curves
    from lit_modules.config import load_run_config

    from .train import Tracking, train_run

    cfg = load_run_config(args.config, args.set or [])
    ws = _workspace(args)
    tracking = Tracking(
        tracking_uri=args.tracking_uri or ws.tracking_uri,
        experiment=args.experiment or Path(args.config).stem,
        run_name=args.run_name,
        tags={"masklab.source": str(Path(args.config).resolve()), "masklab.overrides": " ".join(args.set or [])},
        artifacts=(Path(args.config),),
    )
    result = train_run(cfg, ws, tracking)
    print(f"\nrun {result.run_id} finished in {result.seconds:.1f} s (tracking: {tracking.tracking_uri})")
    for k in sorted(result.metrics):
        print(f"  {k:<14} {result.metrics[k]:.4f}")
    print("\nlayer removal (blocks removed from the back):")
    print(truncation_curves(result.ablation).to_string(float_format=lambda v: f"{v:.4f}"))
    if result.checkpoint:
        print(f"\ncheckpoint: {result.checkpoint}")
    return 0


def resolve_spec_path(spec: str) -> Path:
    """A spec file path, or the name of a shipped spec (``gpt_pbw_demo``)."""
    from lit_modules.config_errors import ConfigError

    path = Path(spec)
    if path.exists():
        return path
    shipped = SPEC_DIR / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
    if shipped.exists():
        return shipped
    names = ", ".join(p.stem for p in sorted(SPEC_DIR.glob("*.yaml")))
    raise ConfigError("SPEC", spec, f"no such file, nor a shipped spec (shipped: {names})")


def _load_spec(args, validate: bool):
    import dataclasses

    from .spec import load_spec

    spec = load_spec(resolve_spec_path(args.spec), getattr(args, "set", None) or [], validate_configs=validate)
    if getattr(args, "study_name", None):
        spec = dataclasses.replace(spec, name=args.study_name)
    return spec


def _stores(args, ws) -> tuple[str, str]:
    storage = args.storage or f"sqlite:///{ws.output_dir / 'optuna.db'}"
    return storage, args.tracking_uri or ws.tracking_uri


def cmd_run(args) -> int:
    from .runner import run_study

    spec = _load_spec(args, validate=True)
    ws = _workspace(args)
    storage, tracking = _stores(args, ws)
    result = run_study(spec, ws, storage, tracking, progress=not args.no_progress, report=not args.no_report,
                       max_trials=args.max_trials)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    print(f"study {spec.name}: ran {result.ran} trial(s); now {counts}")
    for line in result.failures:
        print(f"  failed {line}")
    if result.report_html:
        print(f"report: {result.report_md}\n        {result.report_html}")
    print(f"optuna: {storage}\nmlflow: {tracking}   (mlflow ui --backend-store-uri {tracking})")
    return 0


def cmd_status(args) -> int:
    from .status import study_status

    spec = _load_spec(args, validate=False)
    ws = _workspace(args)
    storage = args.storage or f"sqlite:///{ws.output_dir / 'optuna.db'}"
    print(study_status(spec.name, storage))
    return 0


def cmd_report(args) -> int:
    from .runner import write_study_report

    spec = _load_spec(args, validate=False)
    ws = _workspace(args)
    storage, tracking = _stores(args, ws)
    md, html = write_study_report(spec.name, storage, tracking, ws, None)
    print(f"report: {md}\n        {html}")
    return 0


def cmd_list(args) -> int:
    from lit_modules.registry import DATASETS, MASKINGS, MODELS

    for title, reg in (("models", MODELS), ("maskings", MASKINGS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name, obj in reg.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"  {name:<18} {doc[0] if doc else ''}")
    print("specs:")
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        print(f"  {path.name}")
    return 0


def cmd_data_fetch(args) -> int:
    from lit_modules.data.fetch import fetch

    ws = _workspace(args)
    for path in fetch(args.name, ws.data_dir, mirror=args.mirror, timeout=args.timeout):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masklab", description="Masking ablations for transformer pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run config, tracked in MLflow, then ablate it")
    p.add_argument("config", help="run config YAML (e.g. studies/specs/gpt_tiny.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file in the output dir)")
    p.add_argument("--experiment", help="MLflow experiment name (default: the config file's name)")
    p.add_argument("--run-name", help="MLflow run name")
    _add_dirs(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run a study spec (grid or search): every trial trained, tracked, ablated")
    p.add_argument("spec", help="study spec YAML, or the name of a shipped spec (e.g. gpt_pbw_demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a value of the fixed run config, e.g. trainer.max_steps=20 (recorded with the study)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file optuna.db in the output dir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file mlflow.db in the output dir)")
    p.add_argument("--study-name", help="name the study differently from the spec (a separate study)")
    p.add_argument("--max-trials", type=int, help="run at most this many trials now (the rest on the next run)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per trial)")
    _add_dirs(p)
    p.set_defaults(func=cmd_run)

    for name, func, text in (("status", cmd_status, "table of a study's trials: params, state, objective, duration"),
                             ("report", cmd_report, "(re)generate a study's report from the stores, also mid-study")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="study spec YAML, or the name of a shipped spec")
        p.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the output dir)")
        p.add_argument("--study-name", help="the study's name, if it differs from the spec's")
        if name == "report":
            p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file in the output dir)")
        p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
        p.set_defaults(func=func)

    p = sub.add_parser("list", help="registered models, maskings, datasets and shipped specs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download a named corpus and check its sha256")
    f.add_argument("name")
    f.add_argument("--mirror", help="fetch each file from BASE/<relative path> (a URL or a local folder) instead")
    f.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on the network (default 60)")
    _add_dirs(f)
    f.set_defaults(func=cmd_data_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lit_modules.config_errors import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"masklab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masklab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
