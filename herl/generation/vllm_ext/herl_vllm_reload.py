"""Loaded by vLLM's workers, in vLLM's environment (standard library and vllm only).

herl/generation/vllm_worker.py names `herl_vllm_reload.WeightReload` as the engine's
worker_extension_cls; herl.generation.engines.VLLMEngine puts this folder, which holds only this
module, on the engine's PYTHONPATH.
"""

from __future__ import annotations

from typing import Any


class WeightReload:
    """Mixed into vLLM's workers (worker_extension_cls): load a folder's weights in place.

    vLLM's reload_weights re-processes each layer over a temporary tensor and copies the
    result back into the original parameter. On CPUs a layer that keeps its weight (the
    embedding, and a tied lm_head) builds its oneDNN matmul handle in that processing,
    over the temporary tensor: its logits then come from stale memory (measured: greedy
    tokens unlike a fresh engine's). Its handle is built again over the restored weight."""

    reload_weights: Any  # the worker's own (vLLM's Worker)
    model_runner: Any

    def herl_reload(self, folder: str) -> None:
        self.reload_weights(weights_path=folder)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for module in self.model_runner.get_model().modules():
                weight = getattr(module, "weight", None)
                if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2 and weight.numel():
                    dispatch_cpu_unquantized_gemm(module, remove_weight=False)
