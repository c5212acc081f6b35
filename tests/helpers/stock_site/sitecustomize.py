"""On PYTHONPATH for STOCK engine runs of Qwen3-ASR in the tests (VLLM_PLUGINS="": the
plugin, hence its torchvision stand-in, is not loaded): vLLM's Qwen3-ASR module cannot
be imported on the CPU build without it, so the stock baseline gets the same stand-in
(vllm_affinity.cpu_torchvision) and nothing else of the plugin."""

from vllm_affinity.cpu_torchvision import install

install()
