"""What a timing was measured on, recorded in every result row, and which weights the results belong to.

A speedup without its machine is not a number anyone can check. Every row carries the CPU model, thread count,
library versions, dtype, device and attention kernel, so a results file stays meaningful after it is copied away.
The model fingerprint lets a sweep refuse to mix results of different weights in one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from ..engine import fused

ATTENTION_IMPL = "torch.nn.functional.scaled_dot_product_attention"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The ponder source commit (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def ponder_version() -> str:
    try:
        return version("ponder")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _layer_steps(dev: torch.device) -> str:
    if dev.type != "cpu":
        return "python"
    return fused.status()


def environment(device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """The machine and software a measurement ran on (cheap: cached pieces, no benchmarking)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "attention": ATTENTION_IMPL,
        # the compiled layer halves (engine/fused.py) or the Python ones: same results, different batch-1 speed
        "layer_steps": _layer_steps(dev),
        "ponder": ponder_version(),
        "git_commit": git_commit(),
        "transformers": _pkg_version("transformers"),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        env["gpu"] = torch.cuda.get_device_name(idx)
        env["cuda"] = torch.version.cuda
        env["sdpa_backends"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    return env


def _sha256_file(p: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        if limit is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:  # large files: the first and last `limit` bytes plus the size identify the weights well enough
            h.update(f.read(limit))
            size = p.stat().st_size
            if size > 2 * limit:
                f.seek(size - limit)
                h.update(f.read(limit))
            h.update(str(size).encode())
    return h.hexdigest()


FULL_HASH_LIMIT = 1 << 30  # hash weight files whole up to 1 GiB; sample bigger ones


def model_fingerprint(folder: str | Path) -> dict[str, Any]:
    """A content hash of a checkpoint folder's config and weights, or of a GGUF file (independent of path and file
    times)."""
    folder = Path(folder)
    if folder.is_file():
        size = folder.stat().st_size
        return {"model_sha256": _sha256_file(folder, None if size <= FULL_HASH_LIMIT else 1 << 20)[:16],
                "model_bytes": size}
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    total = sum(f.stat().st_size for f in files)
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_file(f, None if total <= FULL_HASH_LIMIT else 1 << 20).encode())
    return {"model_sha256": h.hexdigest()[:16], "model_bytes": total}


def rss_peak_reset() -> bool:
    """Reset the process's resident-set high-water mark (Linux >= 4.0), so the next peak is one measurement's."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return None
