"""LoRAMux QLoRA trainer: adapters in PEFT format, published to the Hub or a server."""
