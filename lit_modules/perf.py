"""What a training run gets out of its device: throughput, model FLOPs utilization and
the time it waits for data, logged by every run.

``Throughput`` (a Lightning callback that ``run.build_trainer`` adds to every run) logs,
once per logging window of ``trainer.log_every`` steps:

- ``perf/samples_per_s``: training rows (sequences, images, clips) per second;
- ``perf/tokens_per_s``: input tokens per second (text tokens; image patches, video
  tubelets: what ``step_flops`` counts as the batch's tokens, ``train/tokens``);
- ``perf/mfu``: model FLOPs per second (``lit_modules/flops.py``: the matrix products of
  the step, forward and backward, attention over the full T x T square) over the
  device's peak (``peak_flops``); absent where the peak is unknown;
- ``perf/data_wait``: the fraction of the window's wall time the device waited between
  steps for the next batch (its fetch and transfer). On CPU: the time the training loop
  spent between steps. On CUDA: the gaps on the device's own timeline between the end of
  one step's work and the start of the next (CUDA events recorded at both points, read at
  logging steps): host time between steps is no measure there, since the host runs ahead
  of the device and may block anywhere, a pinned-memory allocation included, while the
  device is busy;
- ``perf/step_s``: seconds per step;
- ``perf/host_wait`` (CUDA only): the host's time between steps, as a fraction.

At the end of training, each ``perf/*`` key gets one more point at the final step: the
whole run's figure over every window after the first (the first holds the warm-up:
allocator, kernel selection, compilation, worker start), or the first when it is the
only one. That last point is what reports and dashboards show.

Timing is on the host. On a GPU the step's kernels run asynchronously, so the window's
end waits for the device (``torch.cuda.synchronize``) at logging steps, where Lightning
brings the logged values to the host anyway; no step adds a synchronization of its own.
"""

from __future__ import annotations

import functools
import math
import re
import time

import lightning as L
import torch

# Dense peak FLOP/s per GPU by data type, from the vendors' datasheets (no structured
# sparsity). First match wins (more specific names first); the key is a regex searched
# in ``torch.cuda.get_device_name()``.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"GH200|H200|H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),  # SXM2; no bf16
)
# The CPU's peak is measured: the best of a few fp32 products of this size.
CPU_GEMM_N = 1024
CPU_GEMM_REPEATS = 5


def precision_dtype(precision: str) -> str:
    """The data type the step's matrix products run in under a Lightning precision."""
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


@functools.cache
def cpu_gemm_rate(threads: int) -> float:
    """This CPU's fp32 matrix-product rate (FLOP/s) at ``threads`` threads: the best of
    ``CPU_GEMM_REPEATS`` products of two ``CPU_GEMM_N``-square matrices (a fraction of a
    second, once per process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)  # its own generator: the run's random stream is left as it was
        a, b = torch.randn(CPU_GEMM_N, CPU_GEMM_N, generator=g), torch.randn(CPU_GEMM_N, CPU_GEMM_N, generator=g)
        a @ b  # warm-up
        best = math.inf
        for _ in range(CPU_GEMM_REPEATS):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2.0 * CPU_GEMM_N**3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for the step's device and precision; None when
    the device is not in the table."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dtype = precision_dtype(precision)
        for pattern, peaks in GPU_PEAKS:
            if re.search(pattern, name):
                if dtype not in peaks:
                    return None, f"{name}: no {dtype} peak in the table"
                return peaks[dtype], f"{name} {dtype}, datasheet dense peak"
        return None, f"{name}: not in the table of GPU peaks (lit_modules/perf.py)"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return cpu_gemm_rate(threads), f"CPU fp32 GEMM {CPU_GEMM_N}^3 measured at {threads} threads"
    return None, f"{device.type}: no peak known"


class _Window:
    """Sums over a stretch of steps."""

    def __init__(self):
        self.steps = 0
        self.seconds = self.wait = self.samples = self.tokens = self.flops = 0.0
        self.device_wait: float | None = None  # CUDA: the device's idle gaps between steps
        self.events: list[tuple] = []  # CUDA: (end of the previous step, start, end) per step

    def add(self, other: _Window) -> None:
        if other.device_wait is not None:
            self.device_wait = (self.device_wait or 0.0) + other.device_wait
        for k in ("steps", "seconds", "wait", "samples", "tokens", "flops"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def metrics(self, peak: float | None) -> dict[str, float]:
        if self.steps == 0 or self.seconds <= 0:
            return {}
        wait = self.wait if self.device_wait is None else self.device_wait
        out = {"perf/samples_per_s": self.samples / self.seconds, "perf/tokens_per_s": self.tokens / self.seconds,
               "perf/data_wait": wait / self.seconds, "perf/step_s": self.seconds / self.steps}
        if self.device_wait is not None:
            out["perf/host_wait"] = self.wait / self.seconds  # the host's time between steps, for comparison
        if peak:
            out["perf/mfu"] = self.flops / self.seconds / peak
        return out


class Throughput(L.Callback):
    """Logs ``perf/*`` per logging window and the run's figure at the end (see the module
    docstring). ``summary`` holds that figure after training (also without a logger)."""

    def __init__(self):
        self.every = 1  # the trainer's log_every_n_steps, read at the start of training
        self.peak: float | None = None
        self.peak_source = ""
        self.summary: dict[str, float] = {}
        self._window, self._rest, self._first = _Window(), _Window(), None
        self._last: float | None = None  # when the previous step ended (or the epoch began)
        self._device: torch.device | None = None
        self._start_event = self._end_event = None  # CUDA events of the step under way and the one before
        self._pending: tuple[dict[str, float], int] | None = None  # a closed window's metrics, not yet sent
        self._threads = torch.get_num_threads()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device
        self.every = max(1, trainer.log_every_n_steps)
        self.peak, self.peak_source = peak_flops(self._device, str(trainer.precision))
        self._threads = torch.get_num_threads()  # before the training loader's pin thread sets it to 1

    def params(self) -> dict[str, str]:
        """What the MFU is measured against, for the run's params (recorded after training:
        a param write goes straight to the tracking server, which training never waits on)."""
        return {"perf.peak_flops": f"{self.peak:.4g}" if self.peak else "unknown", "perf.peak_source": self.peak_source}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = time.perf_counter()  # validation and checkpoints between epochs are not step time
        self._end_event = None

    def _cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # queued on the current stream: no wait
        return event

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer)
        now = time.perf_counter()
        if self._last is not None:
            self._window.wait += now - self._last
        if self._cuda():
            self._start_event = self._event()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logging = trainer.global_step % self.every == 0
        # The device's work is waited for where a window closes and where host time stops
        # counting (the last step, an epoch's last step before its validation).
        last = (trainer.global_step >= trainer.max_steps or trainer.should_stop
                or batch_idx + 1 >= trainer.num_training_batches)
        if self._cuda():
            end = self._event()
            self._window.events.append((self._end_event, self._start_event, end))
            self._end_event = end
            if logging or last:
                torch.cuda.synchronize(self._device)  # the window ends when its kernels have run
        now = time.perf_counter()
        if self._last is not None:
            flops, tokens, samples = getattr(pl_module, "last_step_compute", (0.0, 0, 0))
            w = self._window
            w.steps, w.seconds = w.steps + 1, w.seconds + (now - self._last)
            w.samples, w.tokens, w.flops = w.samples + samples, w.tokens + tokens, w.flops + flops
        self._last = now
        if logging:
            self._close_window(trainer, final=trainer.global_step >= trainer.max_steps or trainer.should_stop)

    def _close_window(self, trainer, final: bool) -> None:
        w, self._window = self._window, _Window()
        if w.steps == 0:
            return
        if w.events:  # CUDA: the device's idle gaps between steps (its events have all run by now)
            w.device_wait = sum(prev.elapsed_time(start) for prev, start, _ in w.events if prev is not None) / 1e3
            w.events = []
        if self._first is None:
            self._first = w
        else:
            self._rest.add(w)
        if not final:  # the final step's point is the run's figure (on_train_end)
            # Sent at the next hook: after Lightning has logged this step's own metrics, so
            # a logger that gives up on an unreachable server has the step's curves first.
            self._pending = (w.metrics(self.peak), trainer.global_step)

    def _flush(self, trainer) -> None:
        if self._pending is not None:
            metrics, step = self._pending
            self._pending = None
            _log(trainer, metrics, step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.set_num_threads(self._threads)  # for what the process does next on the CPU (ablation, transfer)
        if self._cuda():
            torch.cuda.synchronize(self._device)
        self._flush(trainer)
        if self._window.steps:
            self._close_window(trainer, final=True)
        run = self._rest if self._rest.steps else self._first
        self.summary = run.metrics(self.peak) if run is not None else {}
        _log(trainer, self.summary, trainer.global_step)


def _log(trainer, metrics: dict[str, float], step: int) -> None:
    if metrics:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
