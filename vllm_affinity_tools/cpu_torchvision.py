"""CPU set-up step: torchvision's Python layer for the CPU torch (idempotent).

    python -m vllm_affinity_tools.cpu_torchvision      # run by scripts/setup_env.sh

Why: vLLM's Qwen2.5-Omni, Qwen3-Omni and Qwen3-ASR modules import transformers'
Qwen2-VL image processor, and transformers' Omni processors load a Qwen2-VL *video*
processor; both need ``torchvision``. No torchvision build for the CPU torch (2.13.0+cpu)
is reachable here: the only wheels (0.28.0, PyPI) are CUDA builds whose ``_C.so`` links
``libc10_cuda.so``, and importing them dies with ``operator torchvision::nms does not
exist``: ``torchvision/_meta_registrations.py`` registers fake kernels for ``nms`` and
``qnms`` unconditionally, while every other op there is registered only if the C++ ops
loaded (its own ``register_meta`` checks ``torchvision.extension._has_ops()``).

What this does, in the CPU venv only (GPU installs have a working torchvision and never
run it):

1. ``pip install --no-deps torchvision==<the release built for this torch>``;
2. deletes the CUDA binaries (``_C.so``, ``image.so``, ``torchvision.libs/``), so nothing
   tries to load them;
3. puts the same ``_has_ops()`` guard on the two unconditional registrations (the file is
   checked to hold each exactly once, or nothing is changed);
4. writes ``torchvision/VLLM_AFFINITY_PYTHON_ONLY`` saying so, and checks in a fresh
   interpreter that ``torchvision``, ``transforms.v2.functional`` and transformers'
   ``Qwen2VLVideoProcessor`` load.

What works afterwards: everything in torchvision written in Python on torch ops (the
``transforms.v2`` functionals transformers' image and video processors use). What fails
loudly: its C++ ops (``torchvision.ops.nms``, ``roi_align``, ..., "Couldn't load custom C++
ops") and its image/video decoders. The audio models never touch either.

When to remove: once a CPU build of torchvision for the pinned torch is installable.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# torch release -> the torchvision release built against it
TORCHVISION_FOR_TORCH = {"2.13.0": "0.28.0"}
MARKER = "VLLM_AFFINITY_PYTHON_ONLY"
GUARDED_OPS = ("nms", "qnms")
CUDA_BINARIES = ("_C.so", "image.so")

CHECK = (
    "import torchvision, torchvision.transforms.v2.functional\n"
    "from transformers import Qwen2VLVideoProcessor\n"
    "Qwen2VLVideoProcessor()\n"
    "print(torchvision.__version__)\n"
)


def guard_registrations(source: str) -> str:
    """``_meta_registrations.py`` with the nms/qnms fake kernels registered only when the
    C++ ops loaded. Raises ``ValueError`` naming the op if a decorator is not found exactly once."""
    for op in GUARDED_OPS:
        old = f'@torch.library.register_fake("torchvision::{op}")'
        if source.count(old) != 1:
            raise ValueError(f"torchvision/_meta_registrations.py: expected one {old!r}, found {source.count(old)}")
        new = (
            f'@(torch.library.register_fake("torchvision::{op}") '
            "if torchvision.extension._has_ops() else (lambda fn: fn))  # vllm-affinity CPU set-up"
        )
        source = source.replace(old, new)
    return source


def _imports_cleanly() -> tuple[bool, str]:
    """(fresh interpreter passes CHECK, its last output line)."""
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


def main() -> None:
    import torch

    if torch.cuda.is_available() or torch.version.cuda is not None:
        print("[torchvision] CUDA torch: leaving torchvision to pip")
        return
    ok, last = _imports_cleanly()
    if ok:
        print(f"[torchvision] {last} imports, nothing to do")
        return
    base = torch.__version__.split("+")[0]
    release = TORCHVISION_FOR_TORCH.get(base)
    if release is None:
        raise SystemExit(f"[torchvision] no torchvision release known for torch {torch.__version__}; "
                         f"known: {TORCHVISION_FOR_TORCH}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"torchvision=={release}"], check=True)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("[torchvision] pip install finished but torchvision is not importable by path")
    pkg = Path(spec.origin).parent
    for name in CUDA_BINARIES:
        (pkg / name).unlink(missing_ok=True)
    shutil.rmtree(pkg.parent / "torchvision.libs", ignore_errors=True)
    meta = pkg / "_meta_registrations.py"
    text = meta.read_text()
    if "vllm-affinity CPU set-up" not in text:
        meta.write_text(guard_registrations(text))
    (pkg / MARKER).write_text(
        f"torchvision {release}'s Python layer for torch {torch.__version__}, written by "
        "vllm_affinity_tools.cpu_torchvision: C++ ops and decoders removed, nms/qnms fake "
        "registrations guarded. Reinstall torchvision to undo.\n"
    )
    ok, last = _imports_cleanly()
    if not ok:
        raise SystemExit(f"[torchvision] still fails to import: {last}")
    print(f"[torchvision] {last}: Python layer installed in {pkg} (C++ ops absent)")


if __name__ == "__main__":
    if sysconfig.get_paths()["purelib"] not in sys.path:
        raise SystemExit("run this with the venv's python")
    main()
