"""``--worker-cls`` for the deep stage: the stock worker with the runner mixin.

vLLM has no runner-class option; the worker builds its runner in ``init_device``.
We let it, then swap in the same runner class with AffinityRunnerMixin (the runner
holds no model or KV cache yet at that point, so nothing is lost but a few buffers).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .runner import AffinityRunnerMixin


class AffinityCPUModelRunner(AffinityRunnerMixin, CPUModelRunner):
    pass


class AffinityCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                "vllm-affinity: the deep stage needs the V1 model runner "
                f"(got {type(self.model_runner).__name__}); set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        self.model_runner = AffinityCPUModelRunner(self.vllm_config, torch.device("cpu"))

