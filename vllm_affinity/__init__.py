"""vllm-affinity: training-free Affinity Pooling of audio tokens for vLLM.

Importing this package is cheap: vLLM is imported only inside :func:`register`,
which vLLM calls in every process through the ``vllm.general_plugins`` entry point
named ``affinity``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Register the adapters with vLLM (idempotent, lazy).

    Errors propagate: a plugin that fails to register must fail loudly, not leave
    the server running stock models while the user believes pooling is on.
    """
    import logging

    from vllm import ModelRegistry

    from . import compat
    from .architectures import ARCHITECTURES

    logger = logging.getLogger("vllm_affinity")
    compat.check()  # every private vLLM seam, named if missing
    for arch, facts in ARCHITECTURES.items():
        module_name, class_name = facts.adapter.split(":")
        current = ModelRegistry.models.get(arch)
        if (getattr(current, "module_name", None), getattr(current, "class_name", None)) != (
            module_name,
            class_name,
        ):
            ModelRegistry.register_model(arch, facts.adapter)
            logger.debug("vllm-affinity: %s -> %s", arch, facts.adapter)

    # deep stage: its KV-cache spec/manager; every architecture: the config hook (it
    # hands the processor the block size and, with a deep stage, turns it on)
    from .architectures import NOT_ADAPTED
    from .engine.config_hook import register_config_hook, register_refusal_hook
    from .engine.kv import register_kv_spec

    register_kv_spec()
    for arch in ARCHITECTURES:
        register_config_hook(arch)
    for arch in NOT_ADAPTED:  # a SPEC for one of these stops start-up, saying why
        register_refusal_hook(arch)

    from .patches import apply_all

    apply_all()


__all__ = ["register", "__version__"]
