"""Prometheus metrics of the plugin, served on vLLM's own ``/metrics``.

Counted in the API server, where the multimodal processor fixes every count before
the engine runs (all counts are deterministic: they follow from the audio length,
the keep ratios and the prompt, never from the hidden states):

* ``vllm_affinity:audio_tokens_in_total``            encoder tokens of the audio (n)
* ``vllm_affinity:audio_tokens_after_input_total``   placeholders after the input stage (K_in)
* ``vllm_affinity:audio_tokens_after_deep_total``    rows above the merge layer (K_deep;
                                                      = K_in without a deep stage)
* ``vllm_affinity:kv_blocks_saved_total``            KV blocks not allocated at the end of
                                                      prefill: stock prompt vs pooled prompt in
                                                      every KV-cache group, summed
                                                      (vllm_affinity.accounting; a request whose
                                                      padded groups cost more counts 0)
* per-request histograms of the same four (``..._per_request``) and
  ``vllm_affinity:requests_total``.

Metric objects are created once per process (prometheus_client refuses duplicates).
"""

from __future__ import annotations

from functools import lru_cache

_BUCKETS_TOKENS = (0, 25, 50, 100, 200, 400, 750, 1500, 3000, 6000)
_BUCKETS_BLOCKS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


@lru_cache(maxsize=1)
def metrics():
    from prometheus_client import Counter, Histogram

    def pair(name: str, doc: str, buckets):
        return (
            Counter(f"vllm_affinity:{name}", doc),
            Histogram(f"vllm_affinity:{name}_per_request", doc + " (per request)", buckets=buckets),
        )

    return {
        "requests": Counter("vllm_affinity:requests", "Requests with audio processed by vllm-affinity"),
        "tokens_in": pair("audio_tokens_in", "Audio tokens out of the encoder", _BUCKETS_TOKENS),
        "after_input": pair("audio_tokens_after_input", "Audio tokens after the input stage", _BUCKETS_TOKENS),
        "after_deep": pair("audio_tokens_after_deep", "Audio rows above the deep merge layer", _BUCKETS_TOKENS),
        "blocks_saved": pair("kv_blocks_saved", "KV blocks saved at the end of prefill", _BUCKETS_BLOCKS),
    }


def record(tokens_in: int, after_input: int, after_deep: int, blocks_saved: float) -> None:
    # a merge layer whose KV-cache groups need padding layers can cost more blocks than it
    # saves on a short audio (accounting.kv_blocks_saved < 0); a counter only grows: count 0
    blocks_saved = max(0.0, blocks_saved)
    m = metrics()
    m["requests"].inc()
    for key, value in (("tokens_in", tokens_in), ("after_input", after_input),
                       ("after_deep", after_deep), ("blocks_saved", blocks_saved)):
        counter, hist = m[key]
        counter.inc(value)
        hist.observe(value)
