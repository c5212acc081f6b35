"""Patch: undecodable audio is a client error (HTTP 400), not a server error (500).

Why: in vLLM 0.32.0, 0.33.0 and 0.34.0 ``vllm.multimodal.media.audio.load_audio`` re-raises libsndfile
errors it does not classify as "unrecognised format" (e.g. a WAV whose 'fmt ' chunk
names a codec libsndfile cannot decode) as ``soundfile.LibsndfileError``, a
RuntimeError, which the OpenAI server maps to 500. A bad upload must be a 400 that
names the problem; the server keeps serving either way.

What upstream would need: classify every decoder error of client-supplied bytes as
ValueError in ``load_audio`` (as it already does for PyAV's FFmpegError).

When to remove: once vLLM maps these errors to ValueError; the version guard below
makes this patch refuse any vLLM it was not checked against (0.32.0, 0.33.0, 0.34.0:
the bug is still there in 0.34.0, whose ``load_audio`` re-raises every LibsndfileError
but the format-detection codes).
"""

from __future__ import annotations


def apply() -> None:
    from . import wrap_once

    def make(original):
        def load_audio(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except ImportError:
                raise
            except RuntimeError as exc:  # soundfile.LibsndfileError and other decoder errors
                raise ValueError(f"Invalid or unsupported audio: {exc}") from exc

        return load_audio

    wrap_once("audio_decode_errors", "vllm.multimodal.media.audio:load_audio", make)
