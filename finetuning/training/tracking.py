"""What a run reports: loss components and throughput per logging window, to trackers, the console and
``OUTPUT_DIR/metrics.jsonl``, and (RECORD_SAMPLE_IDS) the ids each process trained on.

Losses and counts stay on the device between logs (``.item()`` only at log intervals); every process takes part
in a flush (the values are reduced across processes) and only the main process writes.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetuning import atomic
from finetuning.constants import FRAME_RATE_HZ
from finetuning.settings import Settings

if TYPE_CHECKING:
    from finetuning.training.speed import ModelFlops

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricWindow:
    """Loss components, samples, audio seconds and padding since the last log, kept on the device.

    With ``model_flops`` (``speed.ModelFlops``) and the device's ``peak_flops`` (FLOP/s; None on CPU and unlisted
    GPUs) the window also reports ``train/mfu``: model FLOPs per second over the peak of all processes' devices.
    """

    def __init__(self, device, step: int = 0, model_flops: ModelFlops | None = None, peak_flops: float | None = None):
        self.device = device
        self.model_flops = model_flops
        self.peak_flops = peak_flops
        self.reset(step)

    def reset(self, step: int = 0) -> None:
        self.first_step = step
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # auxiliary losses run every AUX_LOSS_EVERY_N_STEPS micro-batches only
        self.micro_batches = 0
        # samples, frames, real and padded positions: kept on the device (no host sync per micro-batch)
        self.counts_on_device = torch.zeros(4, device=self.device, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, loss, out, batch) -> None:
        parts = {"loss": loss, "codec0_loss": out.codec0_loss, "sub_talker_loss": out.sub_talker_loss, **out.aux}
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.micro_batches += 1
        mask = out.attention_mask
        self.counts_on_device[0] += len(batch["id"])
        self.counts_on_device[1] += batch["num_frames"].sum()
        self.counts_on_device[2] += mask.sum()
        self.counts_on_device[3] += mask.numel()

    @contextmanager
    def paused(self):
        """Time spent inside (validation, in-training evaluation) is not training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def flush(self, accelerator, step: int) -> dict[str, float]:
        """``train/<component>`` means and throughput over the window, reduced across processes; then a new window."""
        names = sorted(self.sums)
        values = torch.stack([self.sums[n] / self.counts[n] for n in names])
        values = accelerator.reduce(values, reduction="mean").tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        samples, frames, real, padded = accelerator.reduce(self.counts_on_device, reduction="sum").tolist()
        record = {f"train/{n}": v for n, v in zip(names, values, strict=True)}
        record.update(
            {
                "train/samples_per_s": samples / elapsed,
                "train/audio_s_per_s": frames / FRAME_RATE_HZ / elapsed,
                "train/padding_fraction": 1 - real / max(padded, 1),
                "train/optimizer_steps_per_s": (step - self.first_step) / elapsed,
                "train/tokens_per_s": real / elapsed,  # real talker positions
            }
        )
        if self.model_flops is not None and self.peak_flops:
            flops_per_s = self.model_flops.of(real, frames) / elapsed
            record["train/mfu"] = flops_per_s / (self.peak_flops * accelerator.num_processes)
        self.reset(step)
        return record


class MetricsLog:
    """Every record goes to ``history`` (every process) and, on the main process, to the trackers, the console
    and ``metrics.jsonl``. A resumed run first drops the records logged after the state it resumes from."""

    def __init__(self, accelerator, output_dir: str | Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.history: list[dict] = []

    def truncate(self, last_step: int) -> None:
        """Drop records logged after ``last_step`` (the interrupted run got further than its last save)."""
        if not self.accelerator.is_main_process or not self.path.exists():
            return
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash (blank lines too)
                torn += bool(line.strip())
                continue
            if record["step"] <= last_step:
                kept.append(line)
        if torn:
            logger.warning("%s: dropped %d damaged line(s) (cut short by a crash?)", self.path, torn)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict, trackers: bool = True) -> None:
        """Keep and write ``record``; ``trackers=False`` for values a callback already sent to the trackers."""
        self.history.append(record)
        if not self.accelerator.is_main_process:
            return
        if trackers:
            self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class SampleAudit:
    """RECORD_SAMPLE_IDS: ``OUTPUT_DIR/samples_rank<N>.jsonl`` gets the ids of every batch this process trained
    on and, at the end, the sum of its trainable parameters (every process must end with the same weights)."""

    def __init__(self, settings: Settings, rank: int):
        path = Path(settings.OUTPUT_DIR) / f"samples_rank{rank}.jsonl"
        self.path = path if settings.RECORD_SAMPLE_IDS else None

    def batch(self, epoch: int, ids: list[str]) -> None:
        self._write({"epoch": epoch, "ids": ids})

    def final(self, parameters) -> None:
        if self.path is not None:
            checksum = sum(p.detach().double().sum().item() for p in parameters if p.requires_grad)
            self._write({"final_parameter_sum": checksum})

    def _write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def tracker_config(settings: Settings) -> dict:
    """Settings for trackers: secrets left out, lists joined (TensorBoard's hparams take scalars only)."""
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in settings.public_dict().items()}


def tensorboard_tracker(accelerator):
    """accelerate's TensorBoard tracker, or None when REPORT_TO has none."""
    try:
        return accelerator.get_tracker("tensorboard")
    except (ValueError, KeyError):
        return None
