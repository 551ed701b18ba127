"""LoRAMux Python client: sync and asyncio gRPC clients and the client CLI."""
