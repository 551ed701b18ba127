"""The torch CUDA backend (`--lora-kernel compiled`/`eager` on CUDA, or auto without triton):
the BGMV gather-reduce compiled by torch.compile for every mixed batch; auto on CUDA takes
the explicit Triton kernels (triton_backend.py) where triton is installed."""

from __future__ import annotations

from loramux.server.lora.backend.base import LoraBackend


class CudaBackend(LoraBackend):
    """On a GPU the per-token kernel has no CPU-style fixed cost per GEMM to amortise, and
    the dense path's masked FLOPs over other rows' blocks are not free at large batch, so
    only a batch on one adapter takes plain GEMMs; every mixed batch runs the gather-reduce
    kernel (torch.compile emits it as Triton). Not yet measured on a GPU
    (docs/performance.md)."""

    name = "cuda"
    dense_max_adapters = 1
