"""Monkeypatches of vLLM, one file each, applied from ``register()``.

Each file says why it exists, what upstream would need so it can go, and checks the
vLLM version it was written against (it refuses to apply to another one).
"""

from __future__ import annotations

#: vLLM releases the patches were checked against (the bug each fixes is read in both)
PATCHED_VLLM = ("0.32.0", "0.33.0", "0.34.0")


def vllm_version_matches() -> bool:
    from ..compat import vllm_version

    return vllm_version() in PATCHED_VLLM


def apply_all() -> None:
    from . import audio_decode_errors, kimi_chat_template

    audio_decode_errors.apply()
    kimi_chat_template.apply()
