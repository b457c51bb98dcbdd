"""Models and tokenizers: where they come from (catalogue, folder, GGUF, hub), trainable sets, generation."""
