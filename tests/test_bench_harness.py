"""The benchmark harness's arithmetic (benchmarks/harness.py), on hand-made engine outputs: the
ratios quoted in the README come from it, so a wrong baseline or an inverted ratio must fail
here. No engine runs; the timings themselves are measured, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import harness


def _chat(ttft, decode, turn2, tokens=32, prompt=300, cached=256, kv=1000):
    t1 = {"ttft_s": ttft, "decode_s_per_token": decode, "output_tokens": tokens, "e2e_s": ttft + decode * (tokens - 1),
          "prompt_tokens": prompt, "cached_tokens": 0, "kv_bytes": kv, "kv_blocks_per_group": [kv // 100]}
    t2 = {"ttft_s": turn2, "decode_s_per_token": None, "output_tokens": 1, "e2e_s": turn2,
          "prompt_tokens": prompt + 60, "cached_tokens": cached}
    return {"turn1": t1, "turn2": t2}


def _run(variant, buckets):
    return {"variant": variant, "buckets": {str(b): chats for b, chats in buckets.items()}}


def _bench(truncate_above=None):
    return harness.Bench(
        stem="t", title="t", model=Path("."), dtype="float32", prompt="p", specs={},
        baseline=lambda secs: "stock" if truncate_above is None or secs <= truncate_above else "windows-only",
        extras=(lambda v, secs, row: {"truncated": truncate_above is not None and secs > truncate_above
                                      and v.startswith("stock")}))


def test_ratios_are_baseline_over_variant_medians():
    runs = [
        _run("stock", {10.0: [_chat(1.0, 0.060, 0.2), _chat(1.2, 0.064, 0.2), _chat(5.0, 0.062, 0.2)]}),
        _run("fast", {10.0: [_chat(0.5, 0.060, 0.4, kv=500)] * 3}),
    ]
    rows = harness.aggregate(_bench(), runs, [10.0], e2e_tokens=128)
    fast = next(r for r in rows if r["variant"] == "fast")
    stock = next(r for r in rows if r["variant"] == "stock")
    assert stock["ttft"]["median"] == 1.2 and stock["ttft"]["min"] == 1.0 and stock["ttft"]["max"] == 5.0
    assert fast["ttft_speedup"] == pytest.approx(1.2 / 0.5)  # faster: > 1
    assert fast["turn2_speedup"] == pytest.approx(0.5)  # slower: < 1
    assert fast["decode_speedup"] == pytest.approx(0.062 / 0.060)
    assert fast["kv_ratio"] == pytest.approx(0.5)
    assert fast["e2e"] is None and fast["e2e_speedup"] is None  # 32 tokens: not the 128-token request
    assert stock["ttft_speedup"] == pytest.approx(1.0)


def test_end_to_end_only_at_the_e2e_request():
    runs = [_run("stock", {30.0: [_chat(2.0, 0.1, 0.2, tokens=128)] * 5}),
            _run("v", {30.0: [_chat(1.0, 0.1, 0.2, tokens=128)] * 5})]
    rows = harness.aggregate(_bench(), runs, [30.0], e2e_tokens=128)
    v = next(r for r in rows if r["variant"] == "v")
    assert v["e2e"]["median"] == pytest.approx(1.0 + 0.1 * 127)
    assert v["e2e_speedup"] == pytest.approx((2.0 + 12.7) / (1.0 + 12.7))


def test_truncated_rows_get_no_ratio_and_the_long_bucket_has_its_own_baseline():
    runs = [_run("stock", {60.0: [_chat(1.0, 0.06, 0.2)] * 2}),
            _run("windows-only", {60.0: [_chat(3.0, 0.06, 0.2)] * 2}),
            _run("v", {60.0: [_chat(1.5, 0.06, 0.2)] * 2}),
            _run("stock (again)", {60.0: [_chat(1.0, 0.06, 0.2)] * 2})]
    rows = {r["variant"]: r for r in harness.aggregate(_bench(truncate_above=30), runs, [60.0], e2e_tokens=128)}
    assert rows["stock"]["baseline"] == "windows-only" and rows["stock"]["ttft_speedup"] is None
    assert rows["stock (again)"]["ttft_speedup"] is None
    assert rows["v"]["ttft_speedup"] == pytest.approx(2.0)


def test_stock_variants_run_without_the_plugin_and_with_only_what_the_machine_needs():
    bench = _bench()
    bench.machine_needs = {"enforce_eager": True}
    assert harness.variant_engine(bench, "stock") == ({"enforce_eager": True}, False)
    assert harness.variant_engine(bench, "stock (again)") == ({"enforce_eager": True}, False)
    assert harness.variant_engine(bench, "stock-eager-nopc") == (
        {"enforce_eager": True, "enable_prefix_caching": False}, False)
    assert harness.variant_engine(bench, "paper-aggressive") == ({"enforce_eager": True}, True)
    assert harness.variant_engine(bench, "stock-bs32") == ({"enforce_eager": True, "block_size": 32}, False)
    assert harness.variant_engine(bench, "paper-aggressive-bs32") == ({"enforce_eager": True, "block_size": 32}, True)
    bench.machine_needs = {}
    assert harness.variant_engine(bench, "stock") == ({}, False)  # vLLM's defaults: no flag at all


def test_turn_two_repeats_turn_one_verbatim():
    prompt = "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nHi<|im_end|>\n<|im_start|>assistant\n"
    t2 = harness.chat_turn2(prompt)
    assert t2.startswith(prompt) and t2.count("<|AUDIO|>") == 1 and t2.endswith("<|im_start|>assistant\n")


def test_token_chain_counts_block_alignment_as_the_processor_does():
    """The result files' "audio tokens" column for ``kv_block_align`` variants follows
    ``pooling.block_aligned_count`` with the engine's block size (30 s: 750 -> 558, aligned 622;
    with the encoder stage 375 -> 279, aligned 366)."""
    from benchmarks.bench_offline import audio_stages, resolve_spec

    for variant, plain, aligned in [("input-only", 558, 622), ("input+encoder", 279, 366)]:
        spec = resolve_spec(variant, 12, 8)
        spec_aligned = resolve_spec(variant.replace("input+encoder", "input+encoder+align")
                                    .replace("input-only", "input-only+align"), 12, 8)
        # the presets leave kv_block_align 'auto': aligned under prefix caching (vLLM's default)
        assert audio_stages(spec, 30.0, 12, 128, prefix_caching=False)["k_in"] == plain
        assert audio_stages(spec, 30.0, 12, 128)["k_in"] == aligned
        assert audio_stages(spec_aligned, 30.0, 12, 128)["k_in"] == aligned
        assert (750 - aligned) % 128 == 0
    # the deep stage's rows too (paper-aggressive, 30 s: 622 -> 125, aligned 622 - 3 * 128 = 238)
    deep = resolve_spec("paper-aggressive", 12, 8)
    assert audio_stages(deep, 30.0, 12, 128)["k_deep"] == 238
    assert audio_stages(deep, 30.0, 12, 128, prefix_caching=False)["k_deep"] == 112  # 558 -> 112
