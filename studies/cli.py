"""The ``masklab`` command line.

Heavy modules (torch, Lightning, MLflow) are imported inside the commands that need
them, so commands that only read stores start in about a second.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from stores import keys
from stores.urls import default_storage_url, default_tracking_uri

SPEC_DIR = Path(__file__).resolve().parent / "specs"


def _workspace(args):
    from lit_modules.paths import Workspace

    return Workspace.resolve(getattr(args, "output_dir", None), getattr(args, "data_dir", None))


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
    p.add_argument("--data-dir", help="where data files are found (default $MASKLAB_DATA_DIR, else ./data if it exists, else ../shared/data beside the checkout)")


def _add_outage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-outage", type=float, metavar="S",
                   help="seconds to wait for an unreachable storage or tracking server before a trial fails "
                        "(default $MASKLAB_MAX_OUTAGE or 300; unsent metrics are spooled for `masklab sync`)")


def cmd_train(args) -> int:
    from lit_modules.config import load_run_config

    cfg = load_run_config(args.config, args.set or [])  # checked before torch is imported
    _max_outage(args)
    ws = _workspace(args)
    from lit_modules.ablation import truncation_curves

    from .train import Tracking, train_run

    _warn_secret("--tracking-uri", args.tracking_uri, "MASKLAB_TRACKING_URI")
    tracking = Tracking(
        tracking_uri=args.tracking_uri or os.environ.get("MASKLAB_TRACKING_URI") or ws.tracking_uri,
        experiment=args.experiment or Path(args.config).stem,
        run_name=args.run_name,
        tags={keys.SOURCE: str(Path(args.config).resolve()), keys.OVERRIDES: " ".join(args.set or [])},
        artifacts=(Path(args.config),),
    )
    result = train_run(cfg, ws, tracking)
    print(f"\nrun {result.run_id} finished in {result.seconds:.1f} s (tracking: {_shown(tracking.tracking_uri)})")
    for k in sorted(k for k in result.metrics if not k.startswith("transfer/")):
        print(f"  {k:<14} {result.metrics[k]:.4f}")
    print("\nlayer removal (blocks removed from the back):")
    print(truncation_curves(result.ablation).to_string(float_format=lambda v: f"{v:.4f}"))
    if result.transfer is not None:
        from lit_modules.transfer.stage import summary

        print("\n" + summary(result.transfer))
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
    """The Optuna storage and MLflow tracking URI: the flag, else ``MASKLAB_STORAGE`` /
    ``MASKLAB_TRACKING_URI``, else the sqlite files in the output dir. A password given
    on the command line is visible to every user of the machine (``ps``): warned."""
    storage = getattr(args, "storage", None)
    tracking = getattr(args, "tracking_uri", None)
    _warn_secret("--storage", storage, "MASKLAB_STORAGE")
    _warn_secret("--tracking-uri", tracking, "MASKLAB_TRACKING_URI")
    storage = storage or os.environ.get("MASKLAB_STORAGE") or default_storage_url(ws.output_dir)
    return storage, tracking or os.environ.get("MASKLAB_TRACKING_URI") or ws.tracking_uri


_FLAG_URLS: list[str] = []  # store URLs with a password given as flags: scrubbed from what is printed


def _warn_secret(flag: str, url: str | None, env: str) -> None:
    from stores.urls import has_secret

    if url and has_secret(url):
        _FLAG_URLS.append(url)
        print(f"masklab: warning: {flag} carries a password on the command line, where any user of this machine "
              f"can read it (ps); export {env} instead", file=sys.stderr)


def _shown(url: str) -> str:
    from stores.urls import redact

    return redact(url)


def _scrubbed(text: str) -> str:
    """A line to print, with no store password in it (see ``stores.urls.scrub``)."""
    from stores.urls import scrub

    return scrub(text, *_FLAG_URLS)


def _max_outage(args) -> None:
    """``--max-outage S``: how long this process (and the workers it starts) waits for an
    unreachable storage or tracking server before the trial fails."""
    from lit_modules.config_errors import ConfigError

    value = getattr(args, "max_outage", None)
    if value is None:
        return
    if not value > 0:
        raise ConfigError("--max-outage", value, "must be a number of seconds > 0")
    os.environ["MASKLAB_MAX_OUTAGE"] = str(value)


def cmd_run(args) -> int:
    spec = _load_spec(args, validate=True)  # every error in the spec or --set before anything heavy
    _max_outage(args)
    ws = _workspace(args)
    from .runner import run_study

    storage, tracking = _stores(args, ws)
    result = run_study(spec, ws, storage, tracking, progress=not args.no_progress, report=not args.no_report,
                       max_trials=args.max_trials)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    print(f"study {spec.name}: ran {result.ran} trial(s); now {counts}")
    for line in result.failures:
        print(f"  failed {_scrubbed(line)}")
    if result.report_html:
        print(f"report: {result.report_md}\n        {result.report_html}")
    print(f"optuna: {_shown(storage)}\nmlflow: {_shown(tracking)}")
    from .ui import study_link

    link = study_link(tracking, spec.name)
    print(f"        runs: {link}" if link else f"        browse the runs: {_ui_command(args)}")
    return 0


def _ui_command(args) -> str:
    """The ``masklab ui`` line that opens this command's study in the MLflow UI."""
    from stores.urls import has_secret

    words = ["masklab", "ui", args.spec]
    for flag in ("study_name", "tracking_uri", "output_dir"):
        value = getattr(args, flag, None)
        if value and not (flag == "tracking_uri" and has_secret(value)):  # a password is never printed
            words += [f"--{flag.replace('_', '-')}", str(value)]
    line = " ".join(shlex.quote(w) for w in words)
    if has_secret(getattr(args, "tracking_uri", None) or ""):
        line += "   (with MASKLAB_TRACKING_URI exported)"
    return line


def _worker_args(args, spec_path: str, stores: bool = True) -> list[str]:
    """The options a launched worker needs to join the same study (``stores``: with the
    storage and tracking URLs given on this command line)."""
    out = [spec_path]
    for value in args.set or []:
        out += ["--set", value]
    for flag in ("study_name", *(("storage", "tracking_uri") if stores else ())):
        value = getattr(args, flag, None)
        if value:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return out


def cmd_worker(args) -> int:
    spec = _load_spec(args, validate=True)
    _max_outage(args)
    ws = _workspace(args)
    from .runner import run_study

    storage, tracking = _stores(args, ws)
    who = os.environ.get("MASKLAB_WORKER")
    prefix = f"[worker {who}] " if who else ""
    liveness = {k: v for k, v in (("heartbeat", args.heartbeat), ("grace", args.grace)) if v is not None}
    result = run_study(spec, ws, storage, tracking, progress=False, report=not args.no_report,
                       max_trials=args.max_trials, wait=not args.no_wait, report_once=True,
                       log=lambda m: print(prefix + _scrubbed(m), file=sys.stderr, flush=True), **liveness)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
    print(f"{prefix}study {spec.name}: this worker ran {result.ran} trial(s); now {counts}")
    if result.report_html:
        print(f"{prefix}report: {result.report_html}")
    return 0


def cmd_launch(args) -> int:
    spec = _load_spec(args, validate=True)  # a bad spec fails here once, not in N workers
    _max_outage(args)
    ws = _workspace(args)
    from .launch import ProgressLine, log_tail, parse_devices, start_workers, supervise
    from .runner import write_study_report

    storage, tracking = _stores(args, ws)
    devices = parse_devices(args.devices)
    if devices is None and not args.cpu:
        devices = _visible_gpus()
    log_dir = ws.output_dir / "logs" / spec.name
    # The stores go to the workers in their environment: a command line is public (ps).
    worker_args = [*_worker_args(args, args.spec, stores=False), "--no-report", "--output-dir", str(ws.output_dir),
                   "--data-dir", str(ws.data_dir)]
    workers = start_workers(worker_args, args.workers, devices, log_dir,
                            env={"MASKLAB_STORAGE": storage, "MASKLAB_TRACKING_URI": tracking})
    for w in workers:
        print(f"{w.label}: log {w.log}", file=sys.stderr)
    codes = supervise(workers, ProgressLine(spec.name, storage, workers))
    failed = [w for w, code in zip(workers, codes) if code != 0]
    for w in failed:
        print(f"masklab: {w.label} exited with {w.proc.returncode}; last lines of {w.log}:\n"
              f"{_scrubbed(log_tail(w.log))}", file=sys.stderr)
    if not args.no_report:
        md, html = write_study_report(spec.name, storage, tracking, ws, None)
        print(f"report: {md}\n        {html}")
    print(f"optuna: {_shown(storage)}\nmlflow: {_shown(tracking)}")
    from .ui import study_link

    link = study_link(tracking, spec.name)
    print(f"        runs: {link}" if link else f"        browse the runs: {_ui_command(args)}")
    return 1 if failed else 0


def _visible_gpus() -> list[str] | None:
    """GPU indices this process can see (one worker per GPU), or None on a CPU machine."""
    import torch

    n = torch.cuda.device_count()
    return [str(i) for i in range(n)] if n else None


def cmd_slurm(args) -> int:
    spec = _load_spec(args, validate=True)
    ws = _workspace(args)
    from .launch import SlurmOptions, sbatch_script

    opts = SlurmOptions(array=args.array, gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                        mem=args.mem, time=args.time, partition=args.partition, account=args.account,
                        setup=args.setup or [], log_dir=str(ws.output_dir / "logs" / spec.name / "slurm"))
    # The stores come from the script's environment (see sbatch_script), not the command line.
    worker_args = [*_worker_args(args, str(resolve_spec_path(args.spec).resolve()), stores=False),
                   "--output-dir", str(ws.output_dir), "--data-dir", str(ws.data_dir)]
    command = "masklab slurm " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else "masklab slurm"
    text = sbatch_script(spec.name, worker_args, opts, Path.cwd(), args.storage, args.tracking_uri, command)
    out = Path(args.out or ws.output_dir / f"{spec.name}.sbatch")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the script runs
    out.write_text(text)
    out.chmod(0o755)
    print(f"wrote {out}: {args.array} workers on study {spec.name}\nsubmit with: sbatch {out}")
    return 0


def cmd_status(args) -> int:
    spec = _load_spec(args, validate=False)
    from .status import study_status

    ws = _workspace(args)
    storage, _ = _stores(args, ws)
    print(study_status(spec.name, storage))
    return 0


def cmd_report(args) -> int:
    spec = _load_spec(args, validate=False)
    from .runner import write_study_report

    ws = _workspace(args)
    storage, tracking = _stores(args, ws)
    md, html = write_study_report(spec.name, storage, tracking, ws, None)
    print(f"report: {md}\n        {html}")
    return 0


def cmd_dashboard(args) -> int:
    """Write (or, with --serve, serve and keep fresh) the dashboard of the given studies,
    or of every study in the storage. Reads the stores only: no torch, no Lightning."""
    from lit_modules.config_errors import ConfigError

    if args.refresh <= 0:
        raise ConfigError("--refresh", args.refresh, "must be a number of seconds > 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "must be in [0, 65535] (0 picks a free port)")
    from dashboards.build import DASHBOARD_HTML, load_dashboard, write_dashboard

    ws = _workspace(args)
    storage, tracking = _stores(args, ws)
    names = [_study_of(spec, storage) for spec in args.spec] or None
    out = Path(args.out) if args.out else ws.output_dir / DASHBOARD_HTML
    if args.serve:
        from dashboards.serve import serve

        _warn_public("dashboard --serve", args.host, "anyone who can reach this port can read the studies' "
                     "results (the page has no authentication)")
        try:
            return serve(lambda: load_dashboard(storage, tracking, names), out, args.port, args.refresh, args.host)
        except OSError as e:
            raise ConfigError("--port", args.port, f"cannot listen on {args.host}: {e.strerror}; "
                                                   "pick another port, or 0 for a free one") from None
    dash = load_dashboard(storage, tracking, names)
    path, _ = write_dashboard(dash, out)
    shown = len(dash.views) - 1  # the first view is the overview
    print(f"dashboard: {path} ({shown} stud{'y' if shown == 1 else 'ies'}; open it in a browser, no network needed)")
    if dash.empty:
        print(f"dashboard: {dash.empty}")
    return 0


def cmd_ui(args) -> int:
    """Start ``mlflow ui`` on the study's tracking store (127.0.0.1) and print the link
    to the study's runs table; serve until Ctrl-C. Imports no torch, Lightning or MLflow."""
    from lit_modules.config_errors import ConfigError

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "must be in [0, 65535] (0 or none: a free port)")
    study = _ui_study(args) if args.spec else None  # a bad SPEC fails here, before a server starts
    ws = _workspace(args)
    from .ui import serve_ui

    _warn_secret("--tracking-uri", args.tracking_uri, "MASKLAB_TRACKING_URI")
    tracking = args.tracking_uri or os.environ.get("MASKLAB_TRACKING_URI") or default_tracking_uri(ws.output_dir)
    return serve_ui(tracking, study, args.port or None, ws.output_dir / "mlartifacts",
                    ws.output_dir / "logs" / "mlflow-ui.log")


def _ui_study(args) -> str:
    """The study a ``ui`` SPEC names: a spec file or shipped spec (its name, or
    --study-name), else the name of a study (MLflow experiment) as given."""
    from lit_modules.config_errors import ConfigError

    try:
        resolve_spec_path(args.spec)
    except ConfigError:
        if args.spec.endswith((".yaml", ".yml")) or "/" in args.spec:  # meant a file
            raise
        return args.study_name or args.spec
    return _load_spec(args, validate=False).name


def _study_of(spec: str, storage: str) -> str:
    """The study a dashboard SPEC names: a spec file or shipped spec (its ``name``), or
    the name of a study in the storage."""
    from lit_modules.config_errors import ConfigError
    from stores.storage import StudyNotFoundError, list_studies

    try:
        path = resolve_spec_path(spec)
    except ConfigError:
        try:
            present = list_studies(storage)
        except StudyNotFoundError:
            present = []
        if spec in present:
            return spec
        shipped = ", ".join(p.stem for p in sorted(SPEC_DIR.glob("*.yaml")))
        raise ConfigError("SPEC", spec, f"not a spec file, a shipped spec ({shipped}), nor a study in {_shown(storage)} "
                                        f"(studies there: {', '.join(present) or 'none'})") from None
    from .spec import load_spec

    return load_spec(path, validate_configs=False).name


def one_line(doc: str | None) -> str:
    """The first sentence of a docstring as one plain line (RST ``literals`` unquoted)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    para = para.replace("``", "")
    end = para.find(". ")
    return para if end < 0 else para[: end + 1]


def cmd_storage_proxy(args) -> int:
    """Run Optuna's gRPC storage proxy (with masklab's queue service) in front of an RDB
    storage, until Ctrl-C. Workers then use ``--storage grpc://HOST:PORT``."""
    from lit_modules.config_errors import ConfigError
    from stores.urls import is_grpc, is_journal

    _warn_secret("--storage", args.storage, "MASKLAB_STORAGE")
    storage = args.storage or os.environ.get("MASKLAB_STORAGE")
    if not storage:
        raise ConfigError("--storage", storage, "give the PostgreSQL URL to serve (or export MASKLAB_STORAGE)")
    if is_journal(storage) or is_grpc(storage) or "://" not in storage:
        raise ConfigError("--storage", _shown(storage), "the proxy serves an RDB storage: postgresql://... "
                          "(or sqlite:///PATH on one machine)")
    if not 0 < args.port <= 65535:
        raise ConfigError("--port", args.port, "must be in [1, 65535]")
    if args.threads < 1:
        raise ConfigError("--threads", args.threads, "must be an integer >= 1")
    _max_outage(args)
    _warn_public("storage-proxy", args.host, "anyone who can reach this port can read and write every study in "
                 "the storage (the proxy has no authentication)")
    from stores.proxy import serve
    from studies.coordination import make_storage

    backend = make_storage(storage, args.heartbeat, args.grace)
    try:
        serve(backend, args.host, args.port, args.threads,
              ready=lambda port: print(f"storage-proxy: serving {_shown(storage)} on grpc://{args.host}:{port} "
                                       f"({args.threads} threads; Ctrl-C stops)", flush=True))
    except KeyboardInterrupt:
        print("storage-proxy: stopped", flush=True)
    return 0


def _warn_public(what: str, host: str, risk: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"masklab: warning: {what} listens on {host}, not only this machine: {risk}", file=sys.stderr,
              flush=True)


def cmd_sync(args) -> int:
    """Send the tracking points that a run spooled while its tracking server was down."""
    from studies.spool import sync

    ws = _workspace(args)
    sent = sync(ws.output_dir, log=lambda m: print(m, flush=True))
    print(f"sync: {sent.records} record(s), {sent.points} metric point(s) sent from {sent.files} spool file(s); "
          f"{sent.left} file(s) left")
    return 1 if sent.left else 0


def cmd_list(args) -> int:
    from lit_modules.config import load_yaml
    from lit_modules.registry import DATASETS, MASKINGS, MODELS

    for title, reg in (("models", MODELS), ("maskings", MASKINGS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name, obj in reg.items():
            print(f"  {name:<18} {one_line(obj.__doc__)}")
    from lit_modules.transfer.names import TASK_DESCRIPTION

    print("transfer tasks (a run config's transfer.tasks):")
    for name, what in TASK_DESCRIPTION.items():
        print(f"  {name:<22} {what}")
    print("attention kinds (a run config's attention.kind; lit_modules/masking/attention.py):")
    for name in MODELS.names():
        print(f"  {name:<18} {', '.join(getattr(MODELS.config(name), 'attention_kinds', ('full',)))}.")
    print("specs (masklab run NAME) and run configs (masklab train studies/specs/NAME.yaml):")
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        raw = load_yaml(path)
        if "grid" in raw or "search" in raw or "recipes" in raw:
            what = f"study: {raw.get('description') or raw.get('name')}"
        else:  # a run config: its first comment line says what it is
            first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "# ")
            what = "run config: " + first.lstrip("# ").rstrip(":")
        print(f"  {path.stem:<24} {what}")
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
    _add_outage(p)
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
    _add_outage(p)
    _add_dirs(p)
    p.set_defaults(func=cmd_run)

    def add_study_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="study spec YAML, or the name of a shipped spec")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a value of the fixed run config (the same for every worker)")
        p.add_argument("--storage", help="Optuna storage URL shared by the workers "
                                         "(default: sqlite file optuna.db in the output dir)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file mlflow.db in the output dir)")
        p.add_argument("--study-name", help="name the study differently from the spec (a separate study)")
        _add_outage(p)
        _add_dirs(p)

    p = sub.add_parser("worker", help="join a study and run its trials until none are left (start any number)")
    add_study_options(p)
    p.add_argument("--max-trials", type=int, help="leave after this many trials")
    p.add_argument("--no-wait", action="store_true",
                   help="leave as soon as nothing is queued, even while other workers' trials run "
                        "(default: stay, and retry those trials if their worker dies)")
    p.add_argument("--no-report", action="store_true", help="do not write the report when the study is done")
    p.add_argument("--heartbeat", type=int, metavar="S",
                   help="seconds between a running trial's heartbeats (default 30)")
    p.add_argument("--grace", type=int, metavar="S",
                   help="a running trial without a heartbeat for S seconds is retried elsewhere (default 90)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("launch", help="start N local workers on one study, one per GPU (or CPU share), and watch them")
    add_study_options(p)
    p.add_argument("--workers", type=int, required=True, help="how many worker processes")
    p.add_argument("--devices", help="GPU indices to pin the workers to, round-robin, e.g. 0,1,2,3 "
                                     "(default: every visible GPU; none: CPU threads split evenly)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where GPUs are visible")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("slurm", help="write an sbatch array script: each array task is one worker")
    add_study_options(p)
    p.add_argument("--array", type=int, required=True, help="number of workers (array tasks)")
    p.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per worker (default 1; 0 for CPU workers)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per worker (default 8)")
    p.add_argument("--mem", default="64G", help="memory per worker (default 64G)")
    p.add_argument("--time", default="24:00:00", help="wall-clock limit per task (default 24:00:00)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--setup", action="append", metavar="LINE",
                   help="shell line run before the worker, e.g. 'source .venv/bin/activate' (repeatable)")
    p.add_argument("--out", help="script path (default <output dir>/<study>.sbatch)")
    p.set_defaults(func=cmd_slurm)

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

    p = sub.add_parser("dashboard", help="one self-contained HTML dashboard of all (or the given) studies; "
                                         "--serve keeps it live while studies run")
    p.add_argument("spec", nargs="*", metavar="SPEC",
                   help="study spec YAML, shipped spec name, or study name (default: every study in the storage)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file optuna.db in the output dir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file mlflow.db in the output dir)")
    p.add_argument("--out", help="the page to write (default: dashboard.html in the output dir)")
    p.add_argument("--serve", action="store_true",
                   help="serve the page on 127.0.0.1 and rebuild it from the stores while studies run")
    p.add_argument("--port", type=int, default=8050, help="port for --serve (default 8050; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address for --serve (default 127.0.0.1: this machine only; another is warned about)")
    p.add_argument("--refresh", type=float, default=10.0,
                   help="seconds between rebuilds with --serve; the page reloads itself when results change "
                        "(default 10)")
    p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("ui", help="start the MLflow UI on a study's tracking store (127.0.0.1) and print "
                                  "the link to its runs table")
    p.add_argument("spec", nargs="?", metavar="SPEC",
                   help="study spec YAML, shipped spec name, or study name (default: the list of experiments)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file mlflow.db in the output dir; "
                                          "for a tracking server, the link is printed and nothing started)")
    p.add_argument("--study-name", help="the study's name, if it differs from the spec's")
    p.add_argument("--port", type=int, help="port to serve on (default: a free one)")
    p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("storage-proxy", help="run Optuna's gRPC storage proxy in front of PostgreSQL, for "
                                             "many workers (they use --storage grpc://HOST:PORT)")
    p.add_argument("--storage", help="the RDB storage to serve (default $MASKLAB_STORAGE; postgresql://...)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another is warned about)")
    p.add_argument("--port", type=int, default=13000, help="port to listen on (default 13000)")
    p.add_argument("--threads", type=int, default=32, help="requests served at once (default 32)")
    p.add_argument("--heartbeat", type=int, default=30, metavar="S",
                   help="the heartbeat interval the proxy reports to workers (default 30)")
    p.add_argument("--grace", type=int, default=90, metavar="S",
                   help="a trial without a heartbeat for S seconds is stale (default 90)")
    p.add_argument("--max-outage", type=float, metavar="S",
                   help="seconds to wait for the database to come back (default $MASKLAB_MAX_OUTAGE or 300)")
    p.set_defaults(func=cmd_storage_proxy)

    p = sub.add_parser("sync", help="send the metric points runs spooled while their tracking server was down")
    p.add_argument("--output-dir", help="where all generated output goes (default $MASKLAB_OUTPUT_DIR or ./masklab-runs)")
    p.set_defaults(func=cmd_sync)

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

    sys.excepthook = _scrubbed_excepthook
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"masklab: error: {_scrubbed(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masklab: interrupted", file=sys.stderr)
        return 130


def _scrubbed_excepthook(kind, value, tb) -> None:
    """An uncaught error's traceback, as Python prints it, with no store password in it
    (a library's message may quote the URL it was given)."""
    import traceback

    sys.stderr.write(_scrubbed("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
