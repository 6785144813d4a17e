"""The LLaVA family of layouts, which share their parts (a CLIP-like vision tower, a projector and a
Llama-family LLM): LLaVA-HF (llava_hf.py), the official LLaVA repository's (official.py), xtuner's
LLaVA directories (xtuner_llava.py) and its training .pth / DeepSpeed ZeRO checkpoints (xtuner_pth.py,
zero.py). Each is its own format in the registry."""
