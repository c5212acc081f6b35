"""Comparison of a vLLM result with a reference result (shared by the engine tests)."""

from __future__ import annotations

from dataclasses import dataclass

LOGPROB_TOL = 1e-3  # fp32; a correct implementation sits at ~2e-6 on the tiny model
#: the smallest exact-count cut margin (pooling.cut_margin) a fixture checkpoint may have on the
#: test clips: vLLM and the reference compute the affinity scores with different kernels, and
#: at a margin of 2.4e-7 (the tiny Qwen3-ASR before tiny.amplify_audio_frontend) they chose
#: different groups for a 45 s clip on one CPU and not on another
MIN_CUT_MARGIN = 5e-5


@dataclass
class Parity:
    same_prompt: bool
    same_tokens: bool
    max_logprob_diff: float

    @property
    def ok(self) -> bool:
        return self.same_prompt and self.same_tokens and self.max_logprob_diff <= LOGPROB_TOL

    def __str__(self) -> str:
        return (f"prompt ids equal={self.same_prompt} tokens equal={self.same_tokens} "
                f"max |dlogprob|={self.max_logprob_diff:.2e}")


def compare(prompt_ids, token_ids, step_logprobs, ref) -> Parity:
    """``step_logprobs``: per step a {token_id: logprob} dict (vLLM's top-k)."""
    diff = 0.0
    for step, lp in enumerate(step_logprobs[: len(ref.logprobs)]):
        for tok, val in lp.items():
            diff = max(diff, abs(float(val) - float(ref.logprobs[step][int(tok)])))
    return Parity(
        same_prompt=list(prompt_ids) == list(ref.prompt_token_ids),
        same_tokens=list(token_ids) == list(ref.token_ids),
        max_logprob_diff=diff,
    )


def vllm_compare(out, ref) -> Parity:
    o = out.outputs[0]
    return compare(out.prompt_token_ids, o.token_ids,
                   [{t: lp.logprob for t, lp in step.items()} for step in o.logprobs], ref)


def json_compare(res: dict, ref) -> Parity:
    return compare(res["prompt_token_ids"], res["token_ids"], res["logprobs"], ref)
