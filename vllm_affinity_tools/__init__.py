"""Development tools of vllm-affinity, apart from the runtime package a server needs:
tiny random-weight checkpoint builders, speech synthesis, ASR scoring, checkpoint
converters, the Hugging Face reference implementations (ground truth for parity
tests), a server process helper and the demo."""
