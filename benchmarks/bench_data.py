"""Does the data pipeline keep the device busy? Step time and the fraction of it spent
waiting for the next batch, at several DataLoader worker counts, for real runs.

Each measurement is a real ``lightning.Trainer.fit`` of a shipped spec (shrunk to
``--steps`` timed steps after ``--warmup`` steps), read from the run's own ``Throughput``
callback (``lit_modules/perf.py``): ``perf/step_s``, ``perf/data_wait`` (time between
steps, waiting for the next batch: fetch + transfer, over the wall time), samples per
second and MFU. Worker counts are measured side by side in one process, in interleaved
rounds (round 1: 0, 1, 2 workers; round 2: the same ...), at identical settings (model,
batch, precision, threads, optimizer); the figure is the median over rounds.

Families (``--families``):
  mae    studies/specs/mae_tiny.yaml: MAE on Tiny-ImageNet 64x64, batch 64; each batch's
         images sampled, random-resized-cropped and flipped, then 75% of patches masked
  bert   studies/specs/bert_tiny.yaml: BERT on WikiText-2, 16 rows of 128 tokens; rows
         sampled and padded, 15% of tokens masked with 80/10/10 replacement
  gpt    studies/specs/gpt_tiny.yaml (GPU check: width 768, 12 blocks, 32 x 512 tokens)
  video  studies/specs/video_tiny.yaml on moving-mnist clips

On a GPU (``--device cuda``) the models are scaled up (``GPU_SIZES``) so that the step is
worth measuring, and ``--workers`` may include ``auto`` (``data.num_workers: auto``).

    python benchmarks/bench_data.py                              # this machine: mae, bert at 0, 1, 2 workers
    python benchmarks/bench_data.py --device cuda --precision bf16-mixed \\
        --families gpt,bert,mae,video --workers 0,auto --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPECS = {"mae": "mae_tiny.yaml", "bert": "bert_tiny.yaml", "gpt": "gpt_tiny.yaml", "video": "video_tiny.yaml"}
# Every run: no checkpoint, no transfer, a short validation at the end (outside the timed steps).
COMMON = {"trainer.checkpoint": False, "trainer.progress_bar": False}
SMALL_VAL = {"mae": {"data.val_images": 128}, "bert": {"data.val_windows": 32}, "gpt": {"data.val_windows": 16},
             "video": {"data.val_clips": 16}}
# On a GPU: sizes at which a step is long enough to be worth keeping fed.
GPU_SIZES = {
    "gpt": {"model.width": 768, "model.depth": 12, "model.heads": 12, "model.block_size": 512, "data.batch_size": 32},
    "bert": {"model.width": 768, "model.depth": 12, "model.heads": 12, "data.batch_size": 128},
    "mae": {"model.width": 768, "model.depth": 12, "model.heads": 12, "model.patch_size": 8,
            "model.decoder_width": 512, "model.decoder_depth": 4, "model.decoder_heads": 16, "data.batch_size": 256},
    "video": {"model.width": 768, "model.depth": 12, "model.heads": 12, "data.batch_size": 64},
}


def run_config(family: str, workers, args, compiled: bool = False):
    from lit_modules.config import load_run_config, load_yaml

    spec = load_yaml(ROOT / "studies" / "specs" / SPECS[family])
    spec.pop("transfer", None)
    sets = {**COMMON, **SMALL_VAL[family],
            "trainer.max_steps": args.warmup + args.steps, "trainer.val_every": args.warmup + args.steps,
            # Windows of gcd(warmup, steps): the warm-up fills the first ones, which the figure leaves out.
            "trainer.log_every": math.gcd(args.warmup, args.steps),
            "trainer.accelerator": args.device, "trainer.precision": args.precision,
            "data.num_workers": workers, "trainer.compile": compiled}
    if args.device == "cuda":
        sets.update(GPU_SIZES[family])
    return load_run_config(spec, list(sets.items()))


def measure(family: str, workers, args, workspace, compiled: bool = False) -> dict:
    """One fit; the Throughput callback's figures over the steps after the first window
    (with ``compiled``, the first window holds the compilation)."""
    from lit_modules.perf import Throughput
    from lit_modules.run import build_datamodule, build_model, build_trainer

    cfg = run_config(family, workers, args, compiled)
    dm = build_datamodule(cfg, workspace)
    model = build_model(cfg, dm)
    trainer = build_trainer(cfg, None, [], None)
    perf = next(c for c in trainer.callbacks if isinstance(c, Throughput))
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    s = perf.summary
    return {"workers": dm.loading.workers, "setting": f"{workers}{' compiled' if compiled else ''}",
            "step_s": s["perf/step_s"],
            "data_wait": s["perf/data_wait"], "host_wait": s.get("perf/host_wait", s["perf/data_wait"]),
            "samples_per_s": s["perf/samples_per_s"],
            "tokens_per_s": s["perf/tokens_per_s"], "mfu": s.get("perf/mfu", float("nan")),
            "fit_s": time.perf_counter() - t0, "peak": perf.peak_source}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="mae,bert")
    p.add_argument("--workers", default="0,1,2", help="comma-separated counts, or auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed ones (the first logging window)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--compile", action="store_true",
                   help="also measure each worker setting with trainer.compile (first window: the compilation)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_data: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from harness import machine, quiet_lightning

    quiet_lightning()
    from lit_modules.paths import Workspace

    families = args.families.split(",")
    counts = [w if w == "auto" else int(w) for w in args.workers.split(",")]
    worker_settings = [(w, c) for w in counts for c in ((False, True) if args.compile else (False,))]
    label = {(w, c): f"{w}{' compiled' if c else ''}" for w, c in worker_settings}
    results: dict[str, dict[str, list[dict]]] = {f: {label[k]: [] for k in worker_settings} for f in families}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.resolve(Path(tmp))
        from lit_modules.run import build_datamodule

        for family in families:  # fill the caches (tokenizer, decoded images) outside the rounds
            build_datamodule(run_config(family, 0, args), workspace)
        for r in range(args.rounds):
            for family in families:
                for w, compiled in worker_settings:
                    m = measure(family, w, args, workspace, compiled)
                    results[family][label[w, compiled]].append(m)
                    print(f"round {r + 1} {family:5s} workers {label[w, compiled]:>13} ({m['workers']}): step "
                          f"{m['step_s'] * 1e3:8.1f} ms  data wait {m['data_wait']:6.1%} (host {m['host_wait']:6.1%})  {m['samples_per_s']:9.1f} "
                          f"samples/s  MFU {m['mfu']:.2%}  fit {m['fit_s']:.1f} s", flush=True)
    print(f"\nmedian of {args.rounds} rounds, {args.steps} timed steps each ({args.device}, {args.precision}, "
          f"{args.threads} threads); ratio = step time against {label[worker_settings[0]]} workers; fit = the whole "
          "fit, compilation and the final validation included")
    print(f"{'family':6s} {'workers':>16s} {'step ms':>9s} {'data wait':>10s} {'samples/s':>10s} {'MFU':>7s} {'ratio':>6s} "
          f"{'fit s':>6s}")
    table = []
    for family in families:
        base = None
        for key in worker_settings:
            runs = results[family][label[key]]
            row = {"family": family, "setting": label[key], "workers": runs[0]["workers"],
                   **{k: statistics.median(x[k] for x in runs) for k in ("step_s", "data_wait", "host_wait",
                                                                          "samples_per_s", "tokens_per_s", "mfu",
                                                                          "fit_s")},
                   "peak": runs[0]["peak"]}
            base = base or row["step_s"]
            row["step_ratio"] = row["step_s"] / base
            table.append(row)
            print(f"{family:6s} {label[key] + ' (' + str(row['workers']) + ')':>16s} {row['step_s'] * 1e3:9.1f} "
                  f"{row['data_wait']:10.1%} {row['samples_per_s']:10.1f} {row['mfu']:7.2%} {row['step_ratio']:6.2f} "
                  f"{row['fit_s']:6.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "table": table, "rounds": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
