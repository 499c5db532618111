"""``python -m finetune export``: a run as llama.cpp GGUF files and an Ollama Modelfile.

People run models on their own machines with llama.cpp, Ollama or LM Studio,
all of which read GGUF and none of which read a PEFT adapter. The export
writes the run's base (from its unquantized safetensors, never the NF4 copy
training held), the adapter in llama.cpp's LoRA format, optionally the two
merged, and the files that run them. Nothing here needs a llama.cpp checkout:
the ``gguf`` package writes the files, and :mod:`finetune.export.hf` holds the
few facts of llama.cpp's layout (tensor names, the Q/K row order) it needs.
"""
