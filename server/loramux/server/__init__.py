"""LoRAMux server: one 4-bit base model, many LoRA adapters in the same batch.

Layers, each knowing nothing of the one above it:
engine (tensors, batching, adapters) <- service (gRPC, tenants, registry) <- app (process).
"""
