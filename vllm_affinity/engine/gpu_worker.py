"""GPU worker with the deep-stage runner mixin (V1 runner; CUDA graphs off).

Not exercised by CI (no GPU there); the mixin is the one tested on CPU.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from .runner import AffinityRunnerMixin


class AffinityGPUModelRunner(AffinityRunnerMixin, GPUModelRunner):
    pass


class AffinityGPUWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not GPUModelRunner:
            raise RuntimeError("vllm-affinity: the deep stage needs the V1 model runner")
        self.model_runner = AffinityGPUModelRunner(self.vllm_config, self.device)
