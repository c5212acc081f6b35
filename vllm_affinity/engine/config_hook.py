"""Per-architecture config hook: what the deep stage needs from the rest of vLLM.

vLLM runs ``MODELS_CONFIG_MAP[architecture].verify_and_update_config(vllm_config)``
while building the config (VllmConfig.__post_init__), in the process that parses the
arguments, before any engine process starts. Registering our architecture there is
the config-time extension point (the same map vLLM's own models use).

Every stage: on the CPU build, 32-token KV blocks where a stage is block-aligned and the user gave
no ``--block-size`` (``_choose_block_size``, measured there). With a deep stage it sets, each with a
log line:
* ``kv_block_align: auto`` resolved (both stages): 'keep_more' where prefix caching is on, so
  the deep KV manager caches the compacted blocks (engine/kv.py); it never turns prefix
  caching off: an explicit ``deep.kv_block_align: off`` with prefix caching on is refused;
* ``disable_chunked_mm_input``: an audio span is merged whole, never across chunks;
  ``max_num_batched_tokens`` is raised to fit the longest audio's placeholders;
* eager mode: the merge has data-dependent shapes inside the decoder stack;
* our scheduler and worker classes (refusing conflicting user choices);
* the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0);
* no pipeline parallelism (the merge must see the whole decoder stack).
Validation of the SPEC happens here too, so a bad value stops start-up early.
The hook knows no architecture: it reads the SPEC and the architecture's facts
(:mod:`vllm_affinity.architectures`) through the config layer.
"""

from __future__ import annotations

import logging
import os

from vllm.model_executor.models.config import VerifyAndUpdateConfig

logger = logging.getLogger("vllm.affinity")

SCHEDULER_CLS = "vllm_affinity.engine.scheduler.AffinityScheduler"
CPU_WORKER_CLS = "vllm_affinity.engine.worker.AffinityCPUWorker"
GPU_WORKER_CLS = "vllm_affinity.engine.gpu_worker.AffinityGPUWorker"


class AffinityConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from ..architectures import facts_of_model_config
        from ..config import HF_CONFIG_KEY, server_config

        facts = facts_of_model_config(vllm_config.model_config)
        hf_config = vllm_config.model_config.hf_config
        cache = vllm_config.cache_config
        given = facts.validate(server_config(hf_config))
        cfg = given.with_block_align(prefix_caching=bool(cache.enable_prefix_caching),
                                     prompt_holds_audio=facts.deep_stage)
        if cfg is not given:
            # every process (API server's processor, scheduler, workers) reads the SPEC from this
            # HF config, which travels with the VllmConfig: resolve 'auto' once, here
            setattr(hf_config, HF_CONFIG_KEY, cfg.model_dump(mode="json"))
            logger.info("vllm-affinity: kv_block_align auto -> %s (prefix caching %s)",
                        ", ".join(f"{n}.kv_block_align={getattr(cfg, n).kv_block_align}"
                                  for n in ("input", "deep") if getattr(cfg, n) is not None),
                        "on" if cache.enable_prefix_caching else "off")
        _choose_block_size(cache, cfg)
        # The multimodal processor (which counts KV blocks saved for /metrics) sees only
        # the model config; give it the cache config, whose block size the platform
        # finalizes later in this same config build.
        object.__setattr__(vllm_config.model_config, "_affinity_cache_config", vllm_config.cache_config)
        if cfg.deep is None:
            return
        from .. import compat
        from ..config import AffinityConfigError

        compat.check_deep_stage()  # vLLM 0.34 has no V1 model runner: refused here, saying why
        num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        layer = cfg.deep.resolve_layer(num_layers)
        logger.info("vllm-affinity: deep stage merges after decoder layer %d of %d", layer, num_layers)

        if cache.enable_prefix_caching and cfg.deep.kv_block_align == "off":
            # without the alignment a deep block boundary is a token block boundary only before
            # the first audio, so a cached deep block could be read at the wrong rows: refuse,
            # and leave the choice of vLLM's prefix caching to the user
            raise AffinityConfigError(
                f"invalid vllm-affinity config: hf_overrides.{HF_CONFIG_KEY}.deep.kv_block_align='off' "
                "needs vLLM's prefix caching off (past an audio span a prompt block boundary is not a "
                "deep-layer block boundary): add --no-enable-prefix-caching (enable_prefix_caching=False), "
                "or drop the field ('auto' aligns the rows dropped to the KV block and keeps prefix caching)")
        if cache.enable_prefix_caching:
            logger.info("vllm-affinity: prefix caching kept: the deep layers' blocks are cached by the token "
                        "prefix that determines them (deep.kv_block_align=%s)", cfg.deep.kv_block_align)
        sched = vllm_config.scheduler_config
        if not sched.disable_chunked_mm_input:
            sched.disable_chunked_mm_input = True
            logger.info("vllm-affinity: disable_chunked_mm_input=True (an audio span is merged whole)")
        # a whole audio must fit one step (vLLM refuses to start otherwise, and a smaller
        # step budget must never leave a request unscheduled)
        need = facts.max_item_tokens(cfg)
        if need is not None and sched.max_num_batched_tokens < need:
            logger.info("vllm-affinity: max_num_batched_tokens %d -> %d (an audio of up to %d %s tokens "
                        "is prefilled in one step)", sched.max_num_batched_tokens, need, need, facts.name)
            sched.max_num_batched_tokens = need
        if sched.scheduler_cls not in (None, SCHEDULER_CLS):
            raise ValueError(f"vllm-affinity: the deep stage needs scheduler_cls={SCHEDULER_CLS}, "
                             f"got {sched.scheduler_cls}")
        # None means "decide later" and becomes True on GPU after this hook: set it False
        # explicitly (the runner hands merge failures back on the synchronous output)
        if sched.async_scheduling is not False:
            sched.async_scheduling = False
            logger.info("vllm-affinity: async scheduling disabled (deep stage)")
        sched.scheduler_cls = SCHEDULER_CLS

        par = vllm_config.parallel_config
        if par.pipeline_parallel_size > 1:
            raise ValueError("vllm-affinity: the deep stage does not support pipeline parallelism "
                             "(the merge must see the whole decoder stack)")
        from vllm.platforms import current_platform

        worker = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
        if par.worker_cls not in ("auto", worker):
            raise ValueError(f"vllm-affinity: the deep stage needs worker_cls={worker}, got {par.worker_cls}")
        par.worker_cls = worker
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            logger.info("vllm-affinity: V1 model runner forced (VLLM_USE_V2_MODEL_RUNNER=0)")

        model = vllm_config.model_config
        if not model.enforce_eager:
            model.enforce_eager = True
            logger.info("vllm-affinity: eager mode (torch.compile / CUDA graphs off): the deep merge "
                        "has data-dependent shapes inside the decoder stack")
        from vllm.config import CompilationMode, CUDAGraphMode

        comp = vllm_config.compilation_config
        comp.mode = CompilationMode.NONE
        comp.cudagraph_mode = CUDAGraphMode.NONE


#: the KV block size the plugin picks on the CPU build when a stage is block-aligned and the user
#: gave none (vLLM's CPU default is 128; its GPU default, 16, is left alone)
ALIGNED_CPU_BLOCK_SIZE = 32


def _choose_block_size(cache, cfg) -> None:
    """32-token KV blocks on the CPU build when a stage aligns its drops to the block (prefix caching
    on) and ``--block-size`` was not given. Why, measured (benchmarks/results/workloads_scaled_chat_bs32.md,
    scaled Qwen2-Audio, stock at its defaults with 128): on 128-token blocks a 10 s audio's
    aligned drop rounds to 0 at the input stage (250 -> 250 tokens) and a chat's next turn cannot
    hit the deep layers past an audio whose last 128-token block turn 1 left unfilled
    (paper-aggressive turn 2: 0.37x of stock); on 32-token blocks 250 -> 186 and turn 2 is 1.98x,
    TTFT 1.84x -> 2.21x, decode 0.94x -> 1.05x. The block size alone does not slow vLLM here
    (stock at 32: TTFT 0.98x/0.99x, decode 1.01x/1.06x at 10 s/30 s). A user's --block-size is kept."""
    from vllm.platforms import current_platform

    aligned = [n for n in ("input", "deep")
               if getattr(cfg, n) is not None and getattr(cfg, n).kv_block_align in ("keep_more", "keep_fewer")]
    if (not aligned or not cache.enable_prefix_caching or getattr(cache, "user_specified_block_size", True)
            or not current_platform.is_cpu()):
        return
    cache.block_size = ALIGNED_CPU_BLOCK_SIZE
    cache.user_specified_block_size = True  # the CPU platform sets 128 after this hook unless a size was given
    logger.info("vllm-affinity: KV block size %d (the CPU build's default is 128): %s rounds each audio's drop "
                "to whole blocks, which on 128-token blocks leaves a short audio nearly unpooled and a chat "
                "turn's hit short of the audio; --block-size N keeps yours", ALIGNED_CPU_BLOCK_SIZE,
                " and ".join(f"{n}.kv_block_align" for n in aligned))


class RefuseSpecHook(VerifyAndUpdateConfig):
    """Audio architectures the plugin does not adapt (``architectures.NOT_ADAPTED``): a SPEC
    given for one stops start-up naming why; without one the model runs as stock vLLM."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from ..architectures import NOT_ADAPTED
        from ..config import HF_CONFIG_KEY

        model = vllm_config.model_config
        if getattr(model.hf_config, HF_CONFIG_KEY, None) in (None, "off"):
            return
        arch = next(a for a in model.architectures if a in NOT_ADAPTED)
        raise ValueError(
            f"vllm-affinity: {arch} is not supported: {NOT_ADAPTED[arch]}. To serve it as stock vLLM, "
            f"remove --affinity / hf_overrides.{HF_CONFIG_KEY}")


def register_refusal_hook(arch: str) -> None:
    """Give ``arch`` the refusal hook, unless vLLM has a config hook of its own for it (then a
    SPEC is ignored there, as before: the plugin never replaces vLLM's own hook)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if MODELS_CONFIG_MAP.get(arch, RefuseSpecHook) is RefuseSpecHook:
        MODELS_CONFIG_MAP[arch] = RefuseSpecHook


def register_config_hook(arch: str) -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    current = MODELS_CONFIG_MAP.get(arch)
    if current is not None and current is not AffinityConfigHook:
        raise RuntimeError(f"vllm-affinity: {arch} already has a config hook ({current.__name__})")
    MODELS_CONFIG_MAP[arch] = AffinityConfigHook
