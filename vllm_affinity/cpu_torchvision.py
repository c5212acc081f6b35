"""A stand-in for transformers' ``qwen2_vl.image_processing_qwen2_vl``, CPU build only.

Why: vLLM's Qwen3-ASR model (``vllm.model_executor.models.qwen3_asr``) imports
``qwen2_5_omni_thinker`` -> ``qwen2_5_vl`` -> ``qwen2_vl``, whose top level does
``from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize``.
That transformers module imports ``torchvision.transforms.v2.functional`` at its top
level, and the CPU venv has no torchvision (PyPI builds break against torch
2.13.0+cpu), so importing the audio model fails with ``No module named 'torchvision'``
although no image is ever processed.

What it provides: when (and only when) ``import torchvision`` fails and the real
module is not already imported, :func:`install` registers a module under the real
module's name, ``transformers.models.qwen2_vl.image_processing_qwen2_vl``, holding

* ``smart_resize``: transformers' own ``image_processing_pil_qwen2_vl.smart_resize``
  (that file marks it "Copied from" this one; :func:`install` checks that the two
  function sources are identical, by AST, and refuses to install otherwise);
* ``Qwen2VLImageProcessor``: a class whose construction (``__init__``,
  ``from_pretrained``) raises ``NotImplementedError`` naming this stand-in.

Any other attribute of the module raises ``AttributeError`` naming the stand-in.
Replacing this one transformers module is narrower than faking a ``torchvision``
package: a fake ``torchvision`` would be seen by every ``is_torchvision_available()``
check in transformers and vLLM and switch on image code paths that then fail deep
inside; this stand-in changes nothing but the one module nobody on the audio path uses
beyond ``smart_resize``.

What fails loudly: constructing the stand-in's ``Qwen2VLImageProcessor`` (anything that
imports it from this module path to process images), and any other name taken from the
module (``AttributeError`` naming the stand-in; ``from ... import tvF`` turns that into
Python's plain ``ImportError: cannot import name``).
Unchanged: the package-level ``transformers.models.qwen2_vl.Qwen2VLImageProcessor``,
which transformers itself resolves to ``Qwen2VLImageProcessorPil`` without torchvision.

When to remove: once the CPU venv has a torchvision that imports against its torch,
or once vLLM's ``qwen2_vl`` stops importing this transformers module at top level
(then :func:`install` is a no-op anyway, but the module can go).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

TARGET = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
SOURCE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
MARK = "vllm_affinity.cpu_torchvision"


def _stand_in_error(what: str) -> str:
    return (
        f"{what} is not available: {TARGET} is the stand-in from {MARK} (the CPU build has no "
        "torchvision); only smart_resize is provided, image processing is not"
    )


class Qwen2VLImageProcessor:
    """Placeholder for the torchvision image processor: constructing it raises."""

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(_stand_in_error("Qwen2VLImageProcessor"))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise NotImplementedError(_stand_in_error("Qwen2VLImageProcessor.from_pretrained"))


def _function_source(path: str, name: str) -> str | None:
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.unparse(node)
    return None


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a torchvision build that breaks on import
        return False
    return True


def install() -> bool:
    """Register the stand-in if torchvision cannot be imported. Returns whether the
    stand-in is in place (True also when an earlier call installed it)."""
    have = sys.modules.get(TARGET)
    if have is not None:
        return bool(getattr(have, "__affinity_stand_in__", False))
    if _torchvision_importable():
        return False
    spec = importlib.util.find_spec(TARGET)  # the real file: only read, never executed
    if spec is None or spec.origin is None:
        raise ImportError(f"{MARK}: {TARGET} not found, nothing to stand in for")
    pil = importlib.import_module(SOURCE)
    real = _function_source(spec.origin, "smart_resize")
    ours = _function_source(pil.__file__, "smart_resize")
    if real is None or real != ours:
        raise ImportError(
            f"{MARK}: smart_resize in {TARGET} and {SOURCE} differ; the stand-in cannot alias it"
        )

    mod = types.ModuleType(TARGET, __doc__.split("\n\n")[0])
    mod.__spec__ = importlib.machinery.ModuleSpec(TARGET, None, origin=f"stand-in from {MARK}")
    mod.__affinity_stand_in__ = True
    mod.__all__ = ["Qwen2VLImageProcessor"]
    mod.smart_resize = pil.smart_resize
    mod.Qwen2VLImageProcessor = Qwen2VLImageProcessor

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_stand_in_error(f"{TARGET}.{name}"))

    mod.__getattr__ = __getattr__
    sys.modules[TARGET] = mod  # `from TARGET import name` finds it here
    # `import TARGET as m` and attribute access go through the (lazy) package, which would
    # otherwise hand out transformers' "requires torchvision" placeholder; importing SOURCE
    # above has imported the package
    package = sys.modules["transformers.models.qwen2_vl"]
    package.image_processing_qwen2_vl = mod
    return True
