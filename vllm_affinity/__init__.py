"""vllm-affinity: training-free Affinity Pooling of audio tokens for vLLM.

Importing this package is cheap: vLLM is imported only inside :func:`register`,
which vLLM calls in every process through the ``vllm.general_plugins`` entry point
named ``affinity``.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: architectures we replace, and the "module:Class" that replaces each
MODELS = {
    "Qwen2AudioForConditionalGeneration": (
        "vllm_affinity.adapters.qwen2_audio:AffinityQwen2AudioForConditionalGeneration"
    ),
    "WhisperForConditionalGeneration": "vllm_affinity.adapters.whisper:AffinityWhisperForConditionalGeneration",
}
#: architectures with a deep stage: they get its config-time hook (Whisper refuses the
#: deep stage itself, in its processor and model)
DEEP_STAGE_MODELS = ("Qwen2AudioForConditionalGeneration",)


def register() -> None:
    """Register the affinity model classes with vLLM (idempotent, lazy).

    Errors propagate: a plugin that fails to register must fail loudly, not leave
    the server running stock models while the user believes pooling is on.
    """
    import logging

    from vllm import ModelRegistry

    logger = logging.getLogger("vllm_affinity")
    for arch, target in MODELS.items():
        module_name, class_name = target.split(":")
        current = ModelRegistry.models.get(arch)
        if (getattr(current, "module_name", None), getattr(current, "class_name", None)) == (
            module_name,
            class_name,
        ):
            continue
        ModelRegistry.register_model(arch, target)
        logger.debug("vllm-affinity: %s -> %s", arch, target)

    # deep stage: its KV-cache spec/manager and the config hook that enables it
    from .engine.config_hook import register_config_hook
    from .engine.kv import register_kv_spec

    register_kv_spec()
    for arch in DEEP_STAGE_MODELS:
        register_config_hook(arch)

    from .patches import apply_all

    apply_all()


__all__ = ["register", "MODELS", "__version__"]
