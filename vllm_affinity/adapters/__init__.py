"""One file per architecture on the adapter concept of :mod:`.base`: each says only what
differs from the base (stock token count, placeholder token, model-specific encoder
handling). Which architectures exist, and their engine-facing numbers, is data in
:mod:`vllm_affinity.architectures`."""
