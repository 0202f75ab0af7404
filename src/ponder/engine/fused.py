"""Loader of the fused decode steps (``fused.cpp``), compiled once per machine and torch version.

Why a compiled piece at all: at batch 1 on a CPU, a decode layer half of this model reads 0.8-2.4 MB of weights but
issues 10-20 small tensor calls, and the interpreter's share of each call is as large as its arithmetic; that fixed
cost is also why skipping a unit saved less time than its bytes predict. ``fused.cpp`` issues the same ATen calls
from C++ and does the purely elementwise float32 steps as plain loops with ATen's operations in ATen's order (same
bits; tests compare both paths).

It is optional. Without a C++ compiler, or with ``PONDER_FUSED=0``, the Python layer halves run instead, with one
line on stderr saying why. The build lands in ``$PONDER_KERNEL_DIR`` (default ``~/.cache/ponder/kernels``), keyed by
torch version; ``scripts/setup.sh`` builds it ahead so no run pays the ~30 s compile.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

_SRC = Path(__file__).with_name("fused.cpp")
_SOURCES = [_SRC, _SRC.with_name("kernels.cpp"), _SRC.with_name("packed.cpp")]
_HEADERS = [_SRC.with_name("kernels.h"), _SRC.with_name("qrows.inc")]
_state: dict[str, object] = {}


def build_dir() -> Path:
    root = Path(os.environ.get("PONDER_KERNEL_DIR") or Path.home() / ".cache" / "ponder" / "kernels")
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    return root / f"torch_{tag}"


def enabled() -> bool:
    return os.environ.get("PONDER_FUSED", "1") not in ("0", "false", "no", "off")


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled module, or None (disabled, or the build failed: said once on stderr). Compiles on first use
    when the set-up did not."""
    if "mod" in _state:
        return _state["mod"]  # type: ignore[return-value]
    mod: ModuleType | None = None
    if enabled():
        d = build_dir()
        try:
            from torch.utils.cpp_extension import load as _load

            if shutil.which("ninja") is None:  # torch builds with ninja; the pip package brings one (a dependency)
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            d.mkdir(parents=True, exist_ok=True)
            fresh = not any(d.glob("ponder_fused*.so"))
            if fresh:
                print(f"ponder: compiling the fused decode steps into {d} (once per machine, ~30 s)",
                      file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            # torch rebuilds when a source or a flag changes, not a header: the headers' hash rides along as a flag
            hh = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:12]
            mod = _load("ponder_fused", [str(s) for s in _SOURCES], build_directory=str(d),
                        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", f"-DPONDER_HEADERS={hh}"],
                        extra_ldflags=["-fopenmp"], verbose=verbose)  # -fopenmp: at::parallel_for is OpenMP
            if fresh:
                print(f"ponder: fused decode steps ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - any build or load failure leaves the Python path in charge
            msg = str(e).strip().splitlines()
            print(f"ponder: fused decode steps unavailable ({type(e).__name__}: {msg[-1] if msg else ''}); "
                  "the Python path runs (same results, slower at batch 1). Set PONDER_FUSED=0 to silence this.",
                  file=sys.stderr)
            mod = None
    _state["mod"] = mod
    return mod


def status() -> str:
    """"cpp" when the compiled steps are loaded, "python" otherwise (recorded with every measurement)."""
    return "cpp" if load() is not None else "python"


def main() -> None:
    """scripts/setup.sh: build ahead and say what happened."""
    m = load()
    print(f"fused decode steps: {'built, in ' + str(build_dir()) if m is not None else 'not available (Python path)'}")
