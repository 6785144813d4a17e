"""PEFT LoRA adapters: reading one for --merge-lora (read.py) and writing one from a LitGPT LoRA
checkpoint (export.py)."""
