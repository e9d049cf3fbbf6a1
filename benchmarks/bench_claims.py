"""How fast workers claim trials from a shared study, and that each is claimed once.

N processes start at the same moment on one grid study (points x replicates trials),
each enqueueing the grid under the study lock and then claiming and finishing trials
with no work in between: the worst case for the storage, where every process is in the
claim path all the time. Reported per storage: trials per second, and the counts that
must hold (every grid trial COMPLETE exactly once, no failed worker, no lock error).

    python benchmarks/bench_claims.py                       # sqlite and journal, 4 processes, 200 trials
    python benchmarks/bench_claims.py --storages sqlite,journal,postgresql --processes 8

``postgresql`` starts a throwaway server on 127.0.0.1 (tests/servers.py; needs Debian's
postgresql package) and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spec(points: int, replicates: int):
    from studies.spec import load_spec
    from tests.conftest import TINY

    return load_spec({"name": "claims", "model": "gpt", "data": "wikitext-2", "fixed": TINY["gpt"],
                      "grid": {"masking.p_bw": [round(i / points, 6) for i in range(points)]},
                      "replicates": replicates, "objective": "val/fw_loss"})


def _worker(url: str, points: int, replicates: int, start: float, out: mp.Queue) -> None:
    warnings.simplefilter("ignore")
    from studies.coordination import study_lock
    from studies.runner import claim_trial, enqueue_grid, open_study, suggest

    spec = _spec(points, replicates)
    while time.time() < start:  # every process enters at the same moment
        time.sleep(0.001)
    errors, ran = [], 0
    try:
        study = open_study(spec, url, "unused")
        with study_lock(study._storage, spec.name):
            enqueue_grid(study, spec)
        while (trial := claim_trial(study, spec)) is not None:
            suggest(trial, spec)
            study.tell(trial, 1.0)
            ran += 1
    except Exception as e:  # noqa: BLE001 - reported, and fails the run
        errors.append(f"{type(e).__name__}: {e}")
    out.put({"pid": os.getpid(), "ran": ran, "errors": errors, "end": time.time()})


def measure(url: str, processes: int, points: int, replicates: int) -> dict:
    import optuna

    from studies.coordination import make_storage

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 20  # time for every process to import what it needs
    procs = [ctx.Process(target=_worker, args=(url, points, replicates, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(r["end"] for r in results) - start
    trials = optuna.load_study(study_name="claims", storage=make_storage(url)).get_trials()
    keys = {(t.user_attrs["masklab.grid_key"], t.user_attrs["masklab.replicate"]) for t in trials}
    states = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    errors = [e for r in results for e in r["errors"]]
    return {
        "storage": url.split(":", 1)[0], "processes": processes, "grid_trials": points * replicates,
        "trials": len(trials), "unique": len(keys), "states": states,
        "per_process": sorted(r["ran"] for r in results), "errors": errors,
        "locked_errors": sum("locked" in e.lower() for e in errors),
        "exit_codes": [p.exitcode for p in procs], "seconds": round(elapsed, 2),
        "trials_per_s": round(len(trials) / elapsed, 1),
        "exactly_once": len(trials) == len(keys) == points * replicates
        and states == {"COMPLETE": points * replicates} and not errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storages", default="sqlite,journal", help="comma-separated: sqlite, journal, postgresql")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for kind in args.storages.split(","):
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/claims.db"
            elif kind == "journal":
                url = f"journal:{tmp}/claims.journal"
            elif kind == "postgresql":
                from tests.servers import create_database, postgres_server

                url = create_database(stack.enter_context(postgres_server()), "claims")
            else:
                parser.error(f"--storages: unknown {kind!r} (allowed: sqlite, journal, postgresql)")
            row = measure(url, args.processes, args.points, args.replicates)
            rows.append(row)
            print(f"{row['storage']:<10} {row['processes']} processes  {row['trials']} trials "
                  f"({row['unique']} unique, states {row['states']})  per process {row['per_process']}  "
                  f"{row['seconds']} s = {row['trials_per_s']} trials/s  errors {len(row['errors'])}  "
                  f"exactly once: {row['exactly_once']}", flush=True)
            for e in row["errors"][:5]:
                print(f"    {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["exactly_once"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
