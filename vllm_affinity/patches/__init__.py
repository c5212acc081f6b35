"""Monkeypatches of vLLM, one file each, applied from ``register()``.

Each file says why it exists, what upstream would need so it can go, and checks the
vLLM version it was written against (it refuses to apply to another one).
"""

from __future__ import annotations

import functools
import importlib

#: marks a wrapper this package installed (what makes wrap_once idempotent)
_MARK = "_vllm_affinity_patched"
#: vLLM releases the patches were checked against (the bug each fixes is read in both)
PATCHED_VLLM = ("0.32.0", "0.33.0", "0.34.0")


def vllm_version_matches() -> bool:
    from ..compat import vllm_version

    return vllm_version() in PATCHED_VLLM


def wrap_once(patch: str, where: str, make_wrapper) -> None:
    """Replace ``where`` ("module:attr" or "module:Class.attr") by ``make_wrapper(original)``
    (``functools.wraps`` applied, so ``__wrapped__`` is the original), once: a second call
    finds the mark and does nothing. Refuses a vLLM the patches were not checked against,
    naming ``patch``, before importing anything of it."""
    if not vllm_version_matches():
        raise RuntimeError(f"vllm-affinity patch {patch} is written for vLLM {', '.join(PATCHED_VLLM)}")
    from ..compat import _resolve

    module, _, path = where.partition(":")
    owner_path, _, attr = path.rpartition(".")
    owner = _resolve(f"{module}:{owner_path}") if owner_path else importlib.import_module(module)
    original = getattr(owner, attr)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, attr, wrapper)


def apply_all() -> None:
    from . import audio_decode_errors, kimi_chat_template

    audio_decode_errors.apply()
    kimi_chat_template.apply()
