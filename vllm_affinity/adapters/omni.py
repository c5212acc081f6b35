"""What the Qwen Omni thinkers (Qwen2.5-Omni, Qwen3-Omni-MoE) share on the adapter.

Three things differ from the decoder-only speech LMs the base serves:

* **M-RoPE positions from K.** vLLM computes an Omni prompt's (3, T) positions in
  ``get_mrope_input_positions`` from each audio's *feature length*
  (``iter_mm_features`` -> ``_compute_audio_token_count``), i.e. from the stock count n,
  while the prompt holds K placeholders. :class:`OmniModelMixin` hands the stock code
  each standalone audio's placeholder count instead (a :class:`PlaceholderCount`, which
  ``_compute_audio_token_count`` returns as is), so the K audio rows get K consecutive
  positions (text-like, equal in every component, the paper's AP_in re-indexing) and
  everything after them (text, images) follows as it would after K stock tokens. The
  deep stage's merged positions are the floor of the members' mean in each component
  (:func:`~.base.merge_step`); decode tokens keep theirs.
* **Audio interleaved with video** (``use_audio_in_video``) is refused with a 400: its
  audio rows are spread over the video's time chunks, so they form no span the plugin can
  pool or merge. Send the sound track as its own audio item instead.
* **Other modalities in the same request.** ``embed_multimodal`` returns the image,
  video and audio embeddings in the request's order; only the audio ones are pooled.
"""

from __future__ import annotations

from .base import NUM_KEPT_FIELD, pool_to_counts

#: vLLM / transformers processor kwargs an Omni request may carry beside the plugin's own
OMNI_MM_KWARGS = ("use_audio_in_video", "fps", "size", "min_pixels", "max_pixels", "max_frames",
                  "num_frames", "do_sample_frames", "seconds_per_chunk", "position_id_per_seconds")


class PlaceholderCount(int):
    """An audio's placeholder count (K), passed where vLLM's M-RoPE code expects the
    audio's feature length; :meth:`OmniModelMixin._compute_audio_token_count` returns it
    unchanged."""


class OmniProcessorMixin:
    """In front of :class:`~.base.AffinityProcessorMixin` for the Omni processors."""

    EXTRA_MM_KWARGS = OMNI_MM_KWARGS

    def check_request(self, inputs):
        if (inputs.hf_processor_mm_kwargs or {}).get("use_audio_in_video"):
            raise ValueError(
                "mm_processor_kwargs.use_audio_in_video=true is not supported by vllm-affinity: audio "
                "interleaved with video frames has no contiguous span to pool. Send the sound track as "
                "its own audio item (use_audio_in_video=false)"
            )
        return super().check_request(inputs)


class OmniModelMixin:
    """In front of :class:`~.base.AffinityModelMixin` for the Omni thinkers."""

    def iter_mm_features(self, mm_features):
        counts = {f.mm_position.offset: int(f.mm_position.length) for f in mm_features if f.modality == "audio"}
        for offset, modality, data in super().iter_mm_features(mm_features):
            if modality == "audio":  # standalone audio: its K placeholders, not its feature length
                data = {**data, "audio_feature_length": PlaceholderCount(counts[offset])}
            yield offset, modality, data

    def _compute_audio_token_count(self, audio_feature_length: int) -> int:
        if isinstance(audio_feature_length, PlaceholderCount):
            return int(audio_feature_length)
        return super()._compute_audio_token_count(audio_feature_length)

    def embed_multimodal(self, **kwargs: object):
        kept = kwargs.pop(NUM_KEPT_FIELD, None)
        out: tuple = ()
        # vLLM's order: modalities as their kwargs come, items in order within each
        for modality, item in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "audio":
                audio = tuple(self._process_audio_input(item))
                out += audio if kept is None else pool_to_counts(audio, kept, self.affinity)
            elif modality == "image":
                out += tuple(self._process_image_input(item))
            elif modality == "video":
                out += tuple(self._process_video_input(item))
        return out
