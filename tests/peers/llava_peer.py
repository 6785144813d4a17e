#!/usr/bin/env python
"""The official LLaVA codebase (`llava-torch` from PyPI, haotian-liu/LLaVA) as a test peer.

Run with the LLaVA virtualenv (.venv-llava: transformers 4.37.2, which LLaVA pins); imports only
stdlib, torch and llava.

    .venv-llava/bin/python tests/peers/llava_peer.py logits CKPT_DIR INPUT.pt OUT.pt

Loads CKPT_DIR with LLaVA's own LlavaLlamaForCausalLM.from_pretrained in float32 on CPU, loads its
vision tower from `mm_vision_tower` as LLaVA's builder does (`load_model()`), and runs LLaVA's own
forward pass, whose prepare_inputs_labels_for_multimodal splices the projected image features in
place of each IMAGE_TOKEN_INDEX (-200) in input_ids. INPUT.pt holds {"input_ids": [1, T] with one
-200, "pixel_values": [1, 3, S, S]}; OUT.pt receives {"logits": [1, T - 1 + patches, V]}.

builder.load_pretrained_model is not used: it forces float16 and resizes the embeddings to the
tokenizer; the rest is the same code path.
"""

import sys

import torch


def logits(ckpt: str, inp: str, out: str) -> None:
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=torch.float32)
    model.eval()
    x = torch.load(inp, weights_only=True)
    with torch.no_grad():
        result = model(input_ids=x["input_ids"], images=x["pixel_values"].float(), use_cache=False)
    torch.save({"logits": result.logits}, out)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "logits":
        print(__doc__, file=sys.stderr)
        return 2
    logits(*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
