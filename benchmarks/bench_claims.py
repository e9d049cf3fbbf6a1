"""How fast workers claim trials from a shared study, and that each is claimed once.

Three parts (``--parts``, comma-separated):

``size``       claim latency against the study's size: a grid study of S trials, all
               enqueued (as a grid study is before its workers start), and one process
               claiming and finishing up to 200 of them with no work in between; per
               claim path: masklab's claim (one indexed statement, no lock), Optuna's
               (``Study.ask`` under the study lock: it reads every WAITING trial), and
               masklab's claim through the gRPC storage proxy. S = 100, 1,000, 10,000.
``processes``  claim latency and throughput against concurrent processes (4, 16, 64 by
               default, forked at the same moment) on one grid study of zero-work
               trials, directly on PostgreSQL and through the proxy; every trial must be
               COMPLETE exactly once.
``storages``   the default storages side by side: 4 processes, 200 trials, on sqlite
               (WAL), the journal file and PostgreSQL (throughput and exactly-once).

    python benchmarks/bench_claims.py --parts size,processes --json masklab-runs/bench/claims.json
    python benchmarks/bench_claims.py --parts storages

PostgreSQL is a throwaway server on 127.0.0.1 (tests/servers.py; Debian's postgresql
package), the proxy a ``masklab storage-proxy`` process on 127.0.0.1; both are stopped
at the end by their PIDs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spec(points: int, replicates: int, name: str = "claims"):
    from studies.spec import load_spec
    from tests.conftest import TINY

    return load_spec({"name": name, "model": "gpt", "data": "wikitext-2", "fixed": TINY["gpt"],
                      "grid": {"masking.p_bw": [round(i / points, 8) for i in range(points)]},
                      "replicates": replicates, "objective": "val/fw_loss"})


def _quantiles(ms: list[float]) -> dict:
    ms = sorted(ms)
    if not ms:
        return {"n": 0}
    pick = lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]  # noqa: E731
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(pick(0.99), 2),
            "max_ms": round(ms[-1], 2)}


# ------------------------------------------------------------------ the claim paths


def optuna_claim(study, spec, storage):
    """Optuna's claim, as masklab made it before the indexed queue: under the study
    lock, count the WAITING trials (a read of all of them) and ``Study.ask`` (which reads
    them again and tries them in order)."""
    from optuna.trial import TrialState

    from studies.coordination import study_lock

    with study_lock(storage, spec.name):
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        return study.ask()


def _claim_loop(study, spec, storage, claim, limit: int | None) -> tuple[list[float], int]:
    from studies.runner import suggest

    ms, ran = [], 0
    while limit is None or ran < limit:
        t0 = time.perf_counter()
        trial = claim(study, spec, storage)
        if trial is None:
            break
        ms.append((time.perf_counter() - t0) * 1000)
        suggest(trial, spec)
        study.tell(trial, 1.0)
        ran += 1
    return ms, ran


def _optuna_study(spec, url: str):
    """The study as Optuna opens it from a URL (its cached RDB storage), for Optuna's claim."""
    import optuna

    from studies.coordination import make_storage

    storage = make_storage(url)
    study = optuna.load_study(study_name=spec.name, storage=url)
    return study, storage


# ------------------------------------------------------------------ servers


@contextmanager
def proxy_for(url: str):
    """``masklab storage-proxy`` in front of ``url`` on a free 127.0.0.1 port; yields its grpc:// URL."""
    from tests.servers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "studies.cli", "storage-proxy", "--port", str(port)],
                            cwd=REPO, env={**os.environ, "MASKLAB_STORAGE": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"storage-proxy did not start: {line}{proc.stdout.read() if proc.poll() else ''}")
        yield f"grpc://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _populate(url: str, spec) -> float:
    """Create the study and enqueue its grid (as the first worker does); seconds taken."""
    from studies.coordination import study_lock
    from studies.runner import enqueue_grid, open_study

    t0 = time.perf_counter()
    study = open_study(spec, url, "unused")
    with study_lock(study._storage, spec.name):
        enqueue_grid(study, spec)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ part: size


def part_size(sizes: list[int], claims: int, optuna_claims: int, stack: ExitStack) -> list[dict]:
    from studies.runner import claim_trial, open_study
    from tests.servers import create_database, postgres_server

    server = stack.enter_context(postgres_server())
    rows = []
    for size in sizes:
        # One study per size; the paths claim from it in turn (its size stays ``size``).
        url = create_database(server, f"size_{size}")
        spec = _spec(size // 2, 2)
        setup = _populate(url, spec)
        share = {"masklab": claims, "masklab via proxy": claims, "optuna": optuna_claims}
        if size < sum(share.values()):
            share = {k: max(1, size * v // sum(share.values())) for k, v in share.items()}
        for path in ("masklab", "masklab via proxy", "optuna"):
            limit = share[path]
            with ExitStack() as inner:
                if path == "optuna":
                    study, storage = _optuna_study(spec, url)
                    ms, ran = _claim_loop(study, spec, storage, optuna_claim, limit)
                else:
                    target = inner.enter_context(proxy_for(url)) if "proxy" in path else url
                    from studies.coordination import make_storage

                    storage = make_storage(target)
                    study = open_study(spec, target, "unused", storage=storage)
                    ms, ran = _claim_loop(study, spec, storage, claim_trial, limit)
            row = {"part": "size", "path": path, "study_trials": size, "claims": ran,
                   "enqueue_s": round(setup, 1), **_quantiles(ms)}
            rows.append(row)
            print(f"size {size:>6}  {path:<18} {ran:>4} claims  p50 {row['p50_ms']:>8.2f} ms  "
                  f"p99 {row['p99_ms']:>8.2f} ms  (grid enqueued in {setup:.1f} s)", flush=True)
    return rows


# ------------------------------------------------------------------ part: processes


def _process(url: str, points: int, replicates: int, start: float, out) -> None:
    warnings.simplefilter("ignore")
    from studies.coordination import make_storage, study_lock
    from studies.runner import claim_trial, enqueue_grid, open_study

    spec = _spec(points, replicates)
    errors, ms, ran = [], [], 0
    try:
        storage = make_storage(url)
        study = open_study(spec, url, "unused", storage=storage)
        with study_lock(storage, spec.name):
            enqueue_grid(study, spec, storage)
        while time.time() < start:  # every process claims from the same moment
            time.sleep(0.001)
        ms, ran = _claim_loop(study, spec, storage, claim_trial, None)
    except Exception as e:  # noqa: BLE001 - reported, and fails the run
        errors.append(f"{type(e).__name__}: {e}")
    out.put({"pid": os.getpid(), "ran": ran, "ms": ms, "errors": errors, "end": time.time()})


def _check(url: str, spec) -> dict:
    """Every grid trial COMPLETE exactly once?"""
    import optuna

    from stores.storage import open_storage

    trials = optuna.load_study(study_name=spec.name, storage=open_storage(url)).get_trials()
    keys = [(t.user_attrs.get("masklab.grid_key"), t.user_attrs.get("masklab.replicate")) for t in trials]
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"trials": len(trials), "unique": len(set(keys)), "states": states}


def measure_processes(url: str, processes: int, points: int, replicates: int, lead: float) -> dict:
    ctx = mp.get_context("fork")  # the parent has imported what they need: forks start at once
    out = ctx.Queue()
    start = time.time() + lead
    procs = [ctx.Process(target=_process, args=(url, points, replicates, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(r["end"] for r in results) - start
    spec = _spec(points, replicates)
    check = _check(url, spec)
    errors = [e for r in results for e in r["errors"]]
    total = points * replicates
    return {
        "processes": processes, "grid_trials": total, **check,
        "per_process": sorted(r["ran"] for r in results), "errors": errors,
        "exit_codes": sorted({p.exitcode for p in procs}), "seconds": round(elapsed, 2),
        "trials_per_s": round(check["trials"] / elapsed, 1), **_quantiles([m for r in results for m in r["ms"]]),
        "exactly_once": check["trials"] == check["unique"] == total and check["states"] == {"COMPLETE": total}
        and not errors,
    }


def part_processes(counts: list[int], per_process: int, stack: ExitStack) -> list[dict]:
    import studies.runner  # noqa: F401 - imported before the fork
    from tests.servers import create_database, postgres_server

    server = stack.enter_context(postgres_server())
    rows = []
    for n in counts:
        for path in ("direct", "proxy"):
            url = create_database(server, f"procs_{n}_{path}")
            total = n * per_process
            _populate(url, _spec(total // 2, 2))  # the grid is there before the workers start
            with ExitStack() as inner:
                target = inner.enter_context(proxy_for(url)) if path == "proxy" else url
                row = {"part": "processes", "path": f"PostgreSQL {path}",
                       **measure_processes(target, n, total // 2, 2, lead=5 + n * 0.15)}
            rows.append(row)
            print(f"{n:>3} processes  {row['path']:<18} {row['trials']} trials ({row['unique']} unique, "
                  f"{row['states']})  {row['trials_per_s']:>6.1f} trials/s  claim p50 {row['p50_ms']:.2f} ms  "
                  f"p99 {row['p99_ms']:.2f} ms  per process {min(row['per_process'])}-{max(row['per_process'])}  "
                  f"errors {len(row['errors'])}  exactly once: {row['exactly_once']}", flush=True)
            for e in row["errors"][:3]:
                print(f"    {e}")
    return rows


# ------------------------------------------------------------------ part: storages


def part_storages(kinds: list[str], processes: int, stack: ExitStack, tmp: str) -> list[dict]:
    import studies.runner  # noqa: F401 - imported before the fork

    rows = []
    for kind in kinds:
        if kind == "sqlite":
            url = f"sqlite:///{tmp}/claims.db"
        elif kind == "journal":
            url = f"journal:{tmp}/claims.journal"
        elif kind == "postgresql":
            from tests.servers import create_database, postgres_server

            url = create_database(stack.enter_context(postgres_server()), "claims")
        else:
            raise SystemExit(f"--storages: unknown {kind!r} (allowed: sqlite, journal, postgresql)")
        row = {"part": "storages", "path": kind, **measure_processes(url, processes, 50, 4, lead=10)}
        rows.append(row)
        print(f"{kind:<10} {processes} processes  {row['trials']} trials ({row['unique']} unique, "
              f"states {row['states']})  per process {row['per_process']}  {row['seconds']} s = "
              f"{row['trials_per_s']} trials/s  claim p50 {row['p50_ms']} ms  errors {len(row['errors'])}  "
              f"exactly once: {row['exactly_once']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="size,processes", help="comma-separated: size, processes, storages")
    parser.add_argument("--sizes", default="100,1000,10000", help="study sizes for the size part")
    parser.add_argument("--claims", type=int, default=200, help="claims timed per size (masklab's paths)")
    parser.add_argument("--optuna-claims", type=int, default=30,
                        help="claims timed per size on Optuna's path (each reads the whole queue)")
    parser.add_argument("--processes", default="4,16,64", help="process counts for the processes part")
    parser.add_argument("--per-process", type=int, default=20, help="trials per process in the processes part")
    parser.add_argument("--storages", default="sqlite,journal,postgresql", help="storages for the storages part")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: list[dict] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            if part == "size":
                rows += part_size([int(s) for s in args.sizes.split(",")], args.claims, args.optuna_claims, stack)
            elif part == "processes":
                rows += part_processes([int(n) for n in args.processes.split(",")], args.per_process, stack)
            elif part == "storages":
                rows += part_storages(args.storages.split(","), 4, stack, tmp)
            else:
                parser.error(f"--parts: unknown {part!r} (allowed: size, processes, storages)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r.get("exactly_once", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
