"""Export: merge adapters into the base model (later: GGUF, quantization)."""
