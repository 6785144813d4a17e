#!/usr/bin/env python
"""The official LLaVA codebase (`llava-torch` from PyPI, haotian-liu/LLaVA) as a test peer.

Run with the LLaVA virtualenv (.venv-llava: transformers 4.37.2, which LLaVA pins); imports only
stdlib, torch and llava.

    .venv-llava/bin/python tests/peers/llava_peer.py logits CKPT_DIR INPUT.pt OUT.pt

Loads CKPT_DIR with LLaVA's own LlavaLlamaForCausalLM.from_pretrained in float32 on CPU, loads its
vision tower from `mm_vision_tower` as the builder does (`load_model()`, unless
`unfreeze_mm_vision_tower` true already built it and the checkpoint's ViT tensors filled it), and runs
LLaVA's own forward pass, whose prepare_inputs_labels_for_multimodal splices the projected image
features in place of each IMAGE_TOKEN_INDEX (-200) in input_ids.

INPUT.pt (read with weights_only=True) holds {"input_ids": LongTensor [1, T] with one -200 per
image, "pixel_values": FloatTensor [N, 3, S, S]}; OUT.pt receives
{"logits": FloatTensor [1, T - N + N * patches, V]} (patches = (S / patch_size)**2 with
mm_vision_select_feature "patch", one more with "cls_patch").

builder.load_pretrained_model is not used: it forces float16 (whatever torch_dtype is passed), needs
a tokenizer, resizes the embeddings to the tokenizer's length, and takes the multimodal path only if
the folder name contains "llava"; the model code path is otherwise the same.

The load is strict where LLaVA's is not:
- any key the model expects but the checkpoint lacks is an error (transformers would leave it
  random; for the ViT with unfreeze_mm_vision_tower true, the builder's low_cpu_mem_usage=True load
  leaves it as uninitialised memory). This load uses low_cpu_mem_usage=False, the default, because
  with True transformers 4.37 does not report some missing keys (a `linear` projector built for an
  `mlp2x_gelu` checkpoint stays on the meta device with no missing key reported); for a complete
  checkpoint both give the same weights;
- every parameter must end up on the CPU and finite;
- checkpoint ViT tensors that LLaVA ignores (unfreeze_mm_vision_tower false or absent) are reported
  on stderr; any other unexpected key except rotary_emb.inv_freq is an error.
"""

import sys

import torch

VIT_PREFIX = "model.vision_tower."


def load(ckpt: str):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model, info = LlavaLlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32,
                                                        output_loading_info=True)
    missing = sorted(info["missing_keys"])
    unexpected = sorted(info["unexpected_keys"])
    if missing:
        hint = ""
        if any(k.startswith(VIT_PREFIX) for k in missing):
            hint = (" (unfreeze_mm_vision_tower is true, so LLaVA builds the ViT inside the model and takes its"
                    " weights from the checkpoint; its builder leaves absent ones uninitialised)")
        raise SystemExit(f"llava_peer: {ckpt}: {len(missing)} missing key(s){hint}: {missing[:8]}")
    ignored_vit = [k for k in unexpected if k.startswith(VIT_PREFIX)]
    other = [k for k in unexpected if not k.startswith(VIT_PREFIX) and not k.endswith("rotary_emb.inv_freq")]
    if other:
        raise SystemExit(f"llava_peer: {ckpt}: {len(other)} key(s) LLaVA does not use: {other[:8]}")
    if ignored_vit:
        print(f"llava_peer: {len(ignored_vit)} ViT tensor(s) in the checkpoint ignored by LLaVA "
              f"(unfreeze_mm_vision_tower is not true); ViT from mm_vision_tower", file=sys.stderr)
    tower = model.get_vision_tower()
    if tower is None:
        raise SystemExit(f"llava_peer: {ckpt}: config has no mm_vision_tower; not a LLaVA checkpoint")
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=torch.float32)
    bad = [n for n, p in model.named_parameters() if p.device.type != "cpu" or not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"llava_peer: {ckpt}: {len(bad)} parameter(s) not loaded or not finite: "
                         f"{bad[:8]}")
    return model.eval()


def logits(ckpt: str, inp: str, out: str) -> None:
    model = load(ckpt)
    x = torch.load(inp, weights_only=True)
    with torch.no_grad():
        result = model(input_ids=x["input_ids"], images=x["pixel_values"].float(), use_cache=False)
    torch.save({"logits": result.logits.float().contiguous()}, out)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "logits":
        print(__doc__, file=sys.stderr)
        return 2
    logits(*argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
