"""run.json: what a run did, enough to repeat it, with the time per phase and the peak memory."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def versions() -> dict[str, str]:
    from .. import __version__

    found = {"fatezero-fast": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def peak_memory() -> dict[str, int]:
    """Peak host memory of this process (resident set) and peak CUDA memory allocated by torch, in bytes."""
    with open("/proc/self/statm") as f:  # ru_maxrss can miss memory returned early; the current RSS bounds it
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = {"host_bytes": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, now)}  # ru_maxrss: KiB
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return peak


class RunRecord:
    """Collects the settings and phase times of one run; `write` saves them as run.json."""

    def __init__(self, command: str, argv: list[str], settings: dict):
        self.started = time.perf_counter()
        self.data = {"command": command, "argv": argv, **settings, "versions": versions(), "seconds": {}}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.data["seconds"][name] = round(time.perf_counter() - start, 3)

    def total_seconds(self) -> float:
        return time.perf_counter() - self.started

    def write(self, folder: Path, **more) -> None:
        self.data.update(more, total_seconds=round(self.total_seconds(), 3), peak_memory=peak_memory())
        (folder / "run.json").write_text(json.dumps(self.data, indent=2, default=str))

    def summary(self, what: str, where: Path) -> str:
        memory = self.data["peak_memory"]
        cuda = f", {memory['cuda_bytes'] / 1e9:.2f} GB on the GPU" if "cuda_bytes" in memory else ""
        return (f"done: {what} in {where} ({self.data['total_seconds']:.1f} s, peak memory "
                f"{memory['host_bytes'] / 1e9:.2f} GB on the host{cuda})")
