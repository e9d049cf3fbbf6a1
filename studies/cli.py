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
