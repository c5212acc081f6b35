"""The plugin as vLLM sees it: entry point, registration, stock behaviour when
disabled or off, and server SPECs other than 'off' (each in a fresh engine process)."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from vllm_affinity import pooling as P

from .conftest import MAX_NEW, N_LOGPROBS, PROMPT, load_audio, run_engine_subprocess
from .parity import json_compare



def test_entry_point_named_affinity():
    eps = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
    assert eps.get("affinity") == "vllm_affinity:register"


def test_register_is_idempotent_and_lazy():
    from vllm import ModelRegistry

    import vllm_affinity

    vllm_affinity.register()
    first = ModelRegistry.models["Qwen2AudioForConditionalGeneration"]
    vllm_affinity.register()
    assert ModelRegistry.models["Qwen2AudioForConditionalGeneration"] is first
    assert (first.module_name, first.class_name) == (
        "vllm_affinity.adapters.qwen2_audio", "AffinityQwen2AudioForConditionalGeneration")


def _job(tiny_model, clips, hf_overrides, ratios=(None,), clip_ids=(0, 2)):
    reqs = []
    for i in clip_ids:
        for r in ratios:
            req = {"audios": [str(clips[i])]}
            if r is not None:
                req["mm_processor_kwargs"] = {"affinity_keep_ratio": r}
            reqs.append(req)
    return {"model": str(tiny_model), "hf_overrides": hf_overrides, "prompt": PROMPT,
            "max_tokens": MAX_NEW, "logprobs": N_LOGPROBS, "requests": reqs}


@pytest.fixture(scope="module")
def stock_run(tiny_model, clips, tmp_path_factory):
    """Plugin disabled (VLLM_PLUGINS=""): stock vLLM, even with the SPEC present."""
    job = _job(tiny_model, clips, {"affinity": "paper-aggressive"})
    return run_engine_subprocess(job, tmp_path_factory.mktemp("stock"), env={"VLLM_PLUGINS": ""})


@pytest.mark.engine
def test_disabled_plugin_gives_stock_placeholder_count(stock_run, reference, clips):
    for res, i in zip(stock_run["results"], (0, 2)):
        n = reference.audio_embeddings([load_audio(clips[i])])[0].shape[0]
        assert res["prompt_token_ids"].count(reference.audio_token_id) == n  # nothing pooled


@pytest.mark.engine
def test_input_stage_off_is_token_for_token_stock(stock_run, engine, clips):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=N_LOGPROBS)
    for res, i in zip(stock_run["results"], (0, 2)):
        for extra in ({}, {"mm_processor_kwargs": {"affinity_keep_ratio": 1.0}}):
            out = engine.generate([{"prompt": PROMPT, "multi_modal_data": {"audio": load_audio(clips[i])},
                                    **extra}], sp, use_tqdm=False)[0]
            assert list(out.prompt_token_ids) == res["prompt_token_ids"]
            assert list(out.outputs[0].token_ids) == res["token_ids"]
            for step, lp in zip(res["logprobs"], out.outputs[0].logprobs):
                for t, v in step.items():
                    assert abs(lp[int(t)].logprob - v) <= 1e-5


@pytest.mark.engine
def test_enabled_plugin_pools_where_stock_does_not(stock_run, engine, clips):
    from vllm import SamplingParams

    out = engine.generate([{"prompt": PROMPT, "multi_modal_data": {"audio": load_audio(clips[2])},
                            "mm_processor_kwargs": {"affinity_keep_ratio": 0.7432}}],
                          SamplingParams(max_tokens=1), use_tqdm=False)[0]
    stock_ids = stock_run["results"][1]["prompt_token_ids"]
    audio_id = max(set(stock_ids), key=stock_ids.count)
    n = stock_ids.count(audio_id)
    assert list(out.prompt_token_ids).count(audio_id) == P.num_kept(n, 0.7432) < n


@pytest.mark.parametrize(
    "spec, ref_kw",
    [
        ({"input": {"keep_ratio": 0.5, "window": 3, "method": "affinity"}},
         dict(keep_ratio=0.5, window=3, method="affinity")),
        ("uniform-74", dict(keep_ratio=0.7432, window=1, method="uniform", encoder_real_length=True)),
    ],
    ids=["window3", "uniform74"],
)
@pytest.mark.engine
def test_server_spec_reaches_processor_and_model(spec, ref_kw, tiny_model, clips, reference, tmp_path):
    """The SPEC's ratio sets the placeholder count (processor) and its window/method the
    grouping (model): both must match the reference run with the same settings."""
    run = run_engine_subprocess(_job(tiny_model, clips, {"affinity": spec}, ratios=(None, 0.3)), tmp_path)
    results = iter(run["results"])
    for i in (0, 2):
        for ratio in (ref_kw["keep_ratio"], 0.3):
            kw = {**ref_kw, "keep_ratio": ratio}
            ref = reference.generate(PROMPT, [load_audio(clips[i])], max_new_tokens=MAX_NEW, **kw)
            par = json_compare(next(results), ref)
            assert par.ok, f"spec {spec} clip {i} ratio {ratio}: {par}"


@pytest.mark.engine
def test_additional_config_is_refused_with_a_pointer(tiny_model, clips, tmp_path):
    job = _job(tiny_model, clips, None)
    job["engine_kw_extra"] = {"additional_config": {"affinity": "paper-aggressive"}}
    with pytest.raises(AssertionError, match="--hf-overrides"):
        run_engine_subprocess(job, tmp_path)


@pytest.mark.parametrize("spec", ["paper-aggressive", None])
def test_an_unadapted_audio_architecture_with_a_spec_stops_start_up_saying_why(spec, tiny_model):
    """A SPEC for an audio architecture the plugin does not adapt (here Voxtral, by overriding
    the tiny checkpoint's architecture) must not be silently ignored: vLLM's config build (where
    the per-architecture hook runs, before any engine process) stops naming why; without a
    SPEC the config builds as stock."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_affinity

    vllm_affinity.register()
    overrides = {"architectures": ["VoxtralForConditionalGeneration"]}
    if spec is not None:
        overrides["affinity"] = spec
    args = EngineArgs(model=str(tiny_model), dtype="float32", hf_overrides=overrides)
    if spec is None:
        assert args.create_engine_config().model_config.architecture == "VoxtralForConditionalGeneration"
        return
    with pytest.raises(ValueError, match="vllm-affinity: VoxtralForConditionalGeneration is not supported: "
                                         "Voxtral's prompt is built by mistral_common"):
        args.create_engine_config()


def test_periodic_info_line_counts_tokens(monkeypatch):
    import logging

    from vllm_affinity.adapters import base as m

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("vllm.affinity")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        monkeypatch.setattr(m, "STATS_INTERVAL_S", 3600.0)
        stats = m.TokenStats()
        stats.add([750], [558])
        assert records == []  # not before the interval
        monkeypatch.setattr(m, "STATS_INTERVAL_S", 0.0)
        stats.add([100], [75])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert len(records) == 1
    assert "2 audios in the last" in records[0]
    assert "850 audio tokens in, 633 to the LM (25.5% saved)" in records[0]
