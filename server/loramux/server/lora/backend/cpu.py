"""The CPU backend: dense float32 GEMMs for up to 4 adapters, compiled C++ BGMV beyond."""

from __future__ import annotations

from loramux.server.lora.backend.base import LoraBackend


class CpuBackend(LoraBackend):
    """On this CPU a bf16 GEMM has ~10 us of fixed cost and the compiled gather-reduce ~60 us
    per call, so for a handful of adapters two float32 GEMMs over just their weights (the
    FLOPs spent on other rows' blocks are tiny) beat the per-token kernel (measured with
    bench.profile_engine). Inductor generates the decode kernel as vectorised C++."""

    name = "cpu"
    dense_max_adapters = 4
