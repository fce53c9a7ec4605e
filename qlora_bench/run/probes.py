"""Measurement probes: torch allocator counters, an NVML sampling thread, process RSS, and the environment."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def memory_snapshot(nvml: NvmlSampler | None = None) -> dict:
    """torch's allocator counters (and NVML `used`) right now; None values where there is no CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {
            "allocated": None,
            "reserved": None,
            "max_allocated": None,
            "max_reserved": None,
            "nvml_used": None,
            "cpu_max_rss": max_rss_bytes(),
        }
    torch.cuda.synchronize()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "nvml_used": nvml.used_now() if nvml else None,
        "cpu_max_rss": max_rss_bytes(),
    }


def finish_peaks(m: dict, nvml: NvmlSampler | None, baseline: int | None) -> None:
    """At the end of a measured run: stop NVML sampling and record the peaks (torch allocated / reserved, NVML
    device peak minus the idle baseline, process RSS) into `m`; None where there is no CUDA."""
    import torch

    if nvml and nvml._thread is not None:
        m["nvml_peak_used_bytes"] = nvml.stop()
        m["nvml_samples"] = nvml.samples
    cuda = torch.cuda.is_available()
    m["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    m["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else None
    peak = m.get("nvml_peak_used_bytes")
    device = peak - baseline if (peak and baseline is not None) else None
    if device is not None and device < (m["peak_reserved_bytes"] or 0):
        # NVML's device-wide `used` moved for reasons other than this process (another process freed memory, the
        # previous worker's memory was released late): the difference is not this process's footprint
        m["peak_device_note"] = (
            f"NVML peak {peak:,} - idle baseline {baseline:,} is below torch's reserved peak: another process "
            "changed the device's memory during the run; no device peak recorded"
        )
        device = None
    m["peak_device_bytes"] = device
    m["cpu_max_rss_bytes"] = max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NvmlSampler:
    """Samples NVML device memory `used` every `interval` seconds in a thread and keeps the peak.

    NVML sees what torch's counters do not: the CUDA context, library workspaces and bitsandbytes' paged
    (cudaMallocManaged) optimizer states. It is device-wide, so other processes on the GPU count too: the
    baseline taken before this process touches CUDA is recorded to subtract.
    """

    def __init__(self, device_index: int = 0, interval: float = 0.01):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used_now(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).total)

    def driver(self) -> str:
        v = self._nvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used_now())
            self.samples += 1
            time.sleep(self.interval)

    def start(self) -> NvmlSampler:
        self.peak = self.used_now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self.used_now())
        return self.peak


def try_nvml() -> NvmlSampler | None:
    try:
        return NvmlSampler()
    except Exception:  # no NVML library or no NVIDIA device: CPU runs
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "qlora-bench"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def environment(nvml: NvmlSampler | None) -> dict:
    import torch

    env = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu_name": None,
        "gpu_total_bytes": None,
        "nvml_total_bytes": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "versions": versions(),
        "git_commit": git_commit(),
        "argv": sys.argv[1:],
        "env": {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=props.name, gpu_total_bytes=props.total_memory)
    if nvml:
        env.update(nvml_total_bytes=nvml.total(), driver=nvml.driver())
    return env
