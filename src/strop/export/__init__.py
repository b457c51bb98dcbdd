"""Export: merge adapters into the base model (merge.py), write GGUF files for llama.cpp and Ollama with
their vocabulary, architecture metadata and Modelfile (gguf_*.py, ollama.py), or a merged transformers
folder (save.py); ship.py is `strop export`."""
