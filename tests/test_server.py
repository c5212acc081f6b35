"""A real `vllm-affinity serve` (vllm serve + plugin) on 127.0.0.1 with the openai client."""

from __future__ import annotations

import base64
import subprocess
import sys

import openai
import pytest

from vllm_affinity import pooling as P
from vllm_affinity.engine.config_hook import ALIGNED_CPU_BLOCK_SIZE
from vllm_affinity_tools import speech
from vllm_affinity_tools.demo import CPU_ARGS
from vllm_affinity_tools.serving import ServerProcess

from .conftest import CACHE, load_audio

pytestmark = pytest.mark.server

PRESET_RATIO = 0.7432  # paper-aggressive: input stage
PRESET_DEEP = dict(deep_merge_layer=1, deep_keep_ratio=0.2006, deep_window=3,  # -3 of 4 layers
                   encoder_real_length=True)
QUESTION = "What does the speaker say?"
# vLLM's default prefix caching stays on, so kv_block_align 'auto' rounds each audio's drop (input
# stage) and each span's drop (deep stage) down to a multiple of the KV block; no --block-size is
# given: the config hook picks 32-token blocks on the CPU build (vLLM's CPU default is 128)
BLOCK = ALIGNED_CPU_BLOCK_SIZE


def kept_in(n: int, ratio: float) -> int:
    return P.block_aligned_count(n, P.num_kept(n, ratio), BLOCK, "keep_more")


def kept_deep_in(n: int) -> int:
    from vllm_affinity.plan import deep_kept_count

    return deep_kept_count(n, PRESET_DEEP["deep_keep_ratio"], BLOCK, "keep_more")


def _reference_answer(reference, path, max_new_tokens: int):
    """The transformers reference at the served counts: both stages block-aligned ('auto' under
    vLLM's prefix caching)."""
    prompt = reference.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False,
    )
    return reference.generate(
        prompt, [load_audio(path)], max_new_tokens=max_new_tokens, keep_ratio=PRESET_RATIO,
        pool_fn=lambda x: P.merge(x, P.group_sizes(x, kept_in(x.shape[0], PRESET_RATIO), "affinity", 1)),
        deep_pool_fn=lambda x: P.group_sizes(x, kept_deep_in(x.shape[0]), "affinity", 3),
        **PRESET_DEEP)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(tiny_model, ["--plugin", "affinity", "--affinity", "paper-aggressive", *CPU_ARGS],
                       log_path=log, served_model_name="tiny",
                       env={"VLLM_LOGGING_LEVEL": "DEBUG"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def media():
    d = CACHE / "server-media"
    # about 20 words (6-8 s, 150-200 audio tokens): each drops at least one 32-token block at 0.7432
    return {
        "mp3_44k": speech.say("Send me the report before noon on Friday, and copy the whole team on the reply "
                              "so that everyone knows the plan.", d / "a44k-long.mp3", sample_rate=44100),
        "flac_48k": speech.say("The meeting moved to room twelve on the third floor, right after lunch, because "
                               "the projector in the old room is broken again.", d / "b48k-long.flac",
                               sample_rate=48000),
        "wav_8k": speech.say("Call me back tomorrow morning about the contract, the price, and the delivery "
                             "date for the new machines we ordered.", d / "c8k-long.wav", sample_rate=8000),
    }


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _input_audio(path, fmt):
    return {"type": "input_audio", "input_audio": {"data": _b64(path), "format": fmt}}


def _audio_url(path, mime):
    return {"type": "audio_url", "audio_url": {"url": f"data:{mime};base64,{_b64(path)}"}}


def _chat(client, part, max_tokens=8, **extra):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
        max_tokens=max_tokens, temperature=0, extra_body=extra or None,
    )


def _n_audio(reference, path) -> int:
    return reference.audio_embeddings([load_audio(path)])[0].shape[0]


@pytest.mark.parametrize(
    "kind, make",
    [
        ("input_audio wav 16k", lambda clips, m: _input_audio(clips[1], "wav")),
        ("input_audio wav 8k", lambda clips, m: _input_audio(m["wav_8k"], "wav")),
        ("audio_url mp3 44.1k", lambda clips, m: _audio_url(m["mp3_44k"], "audio/mpeg")),
        ("audio_url flac 48k", lambda clips, m: _audio_url(m["flac_48k"], "audio/flac")),
    ],
)
def test_content_types_formats_and_rates_show_the_reduction(client, clips, media, reference, kind, make):
    part = make(clips, media)
    path = {"input_audio wav 16k": clips[1], "input_audio wav 8k": media["wav_8k"],
            "audio_url mp3 44.1k": media["mp3_44k"], "audio_url flac 48k": media["flac_48k"]}[kind]
    n = _n_audio(reference, path)
    pooled = _chat(client, part)
    full = _chat(client, part, mm_processor_kwargs={"affinity_keep_ratio": 1.0})
    assert full.usage.prompt_tokens - pooled.usage.prompt_tokens == n - kept_in(n, PRESET_RATIO) > 0
    half = _chat(client, part, mm_processor_kwargs={"affinity_keep_ratio": 0.5})
    assert full.usage.prompt_tokens - half.usage.prompt_tokens == n - kept_in(n, 0.5)


def test_served_answer_matches_reference(client, media, reference):
    """44.1 kHz mp3 through decode + soxr + chat template + pooling: same greedy tokens."""
    path = media["mp3_44k"]
    r = _chat(client, _audio_url(path, "audio/mpeg"), max_tokens=12, logprobs=True, top_logprobs=1,
              return_tokens_as_token_ids=True)
    ref = _reference_answer(reference, path, 12)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    served = [int(t.token.removeprefix("token_id:")) for t in r.choices[0].logprobs.content]
    assert served == ref.token_ids[: len(served)]
    assert len(served) == 12 or r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("bad", [1.5, 0, -0.2, "half", True, None])
def test_bad_override_is_400_naming_the_field_then_server_still_serves(client, clips, bad):
    part = _input_audio(clips[0], "wav")
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, part, mm_processor_kwargs={"affinity_keep_ratio": bad})
    assert "affinity_keep_ratio" in str(e.value)
    ok = _chat(client, part, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_text_only_request(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"


def test_log_says_what_the_plugin_did(server, client, clips):
    _chat(client, _input_audio(clips[0], "wav"), max_tokens=1)
    log = server.log()
    assert "vllm-affinity: Qwen2-Audio with Affinity Pooling, input stage: keep_ratio=0.7432" in log
    assert "deep stage: merge_layer=-3, keep_ratio=0.2006, window=3" in log
    assert "vllm-affinity: deep stage merges after decoder layer 1 of 4" in log
    assert "kv_block_align auto -> input.kv_block_align=keep_more, deep.kv_block_align=keep_more " \
           "(prefix caching on)" in log
    assert "vllm-affinity: prefix caching kept" in log
    assert "vllm-affinity: KV block size 32 (the CPU build's default is 128)" in log
    assert "vllm-affinity: audio tokens [50] -> [50] (keep_ratio=0.7432)" in log  # a drop of 12 < one block
    assert "Traceback" not in log


def test_bad_server_spec_stops_start_up_naming_the_field(tiny_model, tmp_path):
    """Plain `vllm serve` with a bad --hf-overrides SPEC exits non-zero, naming the field."""
    with pytest.raises(RuntimeError) as e:
        with ServerProcess(tiny_model, ["--hf-overrides", '{"affinity": {"input": {"keep_ratio": 2}}}',
                                        *CPU_ARGS], log_path=tmp_path / "bad.log", plain_vllm=True):
            pass
    assert "server exited" in str(e.value)
    assert "hf_overrides.affinity.input.keep_ratio" in (tmp_path / "bad.log").read_text()


def test_cli_rejects_bad_spec_before_starting_vllm(tiny_model):
    r = subprocess.run([sys.executable, "-m", "vllm_affinity.cli", "serve", str(tiny_model),
                        "--affinity", '{"input": {"keep_ratio": 0.5, "method": "random"}}'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "input.method" in r.stderr and "exec" not in r.stderr


def test_data_parallel_two_engines_serve_the_deep_stage(tiny_model, media, reference, tmp_path):
    """Users who outgrow one engine scale out with vLLM itself: ``--data-parallel-size 2`` starts two
    engine cores (each with the plugin's scheduler, worker and deep KV group) behind two API servers.
    Concurrent requests spread over both engines and every one answers the reference's tokens."""
    import concurrent.futures as cf

    from vllm_affinity_tools.serving import metric, metric_by_label

    path = media["mp3_44k"]
    args = ["--plugin", "affinity", "--affinity", "paper-aggressive", *CPU_ARGS, "--data-parallel-size", "2"]
    with ServerProcess(tiny_model, args, log_path=tmp_path / "dp.log", served_model_name="tiny") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=300)

        def ask(_):
            r = _chat(client, _audio_url(path, "audio/mpeg"), max_tokens=6, logprobs=True, top_logprobs=1,
                      return_tokens_as_token_ids=True)
            return r.usage.prompt_tokens, [int(t.token.removeprefix("token_id:")) for t in r.choices[0].logprobs.content]

        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        per_engine = metric_by_label(srv.base_url, "vllm:request_success_total", "engine")
        deep_total = metric(srv.base_url, "vllm_affinity:audio_tokens_after_deep_total")
        log = srv.log()
    assert log.count("vllm-affinity: scheduler bound 1 deep KV-cache group(s)") == 2, "one per engine core"
    assert sorted(per_engine) == ["0", "1"] and all(v > 0 for v in per_engine.values()), per_engine
    assert "Traceback" not in log
    kept_deep = kept_deep_in(kept_in(_n_audio(reference, path), PRESET_RATIO))
    ref = _reference_answer(reference, path, 6)
    for prompt_tokens, tokens in answers:
        assert prompt_tokens == len(ref.prompt_token_ids)
        assert tokens == ref.token_ids[: len(tokens)] and len(tokens) >= 1
    assert deep_total == 8 * kept_deep, (deep_total, kept_deep)
