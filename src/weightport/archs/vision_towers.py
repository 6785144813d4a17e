"""The ViT encoders vision-language models embed, as transformers names them below a prefix:
SigLIP (Idefics3) and CLIP (LLaVA) share their encoder layers and differ in the embeddings."""

from __future__ import annotations


def vit_tensors(prefix: str, s: dict, *, clip: bool) -> list:
    """`s`: hidden, intermediate, layers, channels, patch, positions. CLIP adds a class embedding
    and a pre-encoder layer norm and has no patch-embedding bias."""
    H, I, p = s["hidden"], s["intermediate"], s["patch"]

    def linear(name, out, inp):
        return [(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))]

    def norm(name):
        return [(f"{name}.weight", (H,)), (f"{name}.bias", (H,))]

    out = [(f"{prefix}.embeddings.class_embedding", (H,))] if clip else []
    out.append((f"{prefix}.embeddings.patch_embedding.weight", (H, s["channels"], p, p)))
    if not clip:
        out.append((f"{prefix}.embeddings.patch_embedding.bias", (H,)))
    out.append((f"{prefix}.embeddings.position_embedding.weight", (s["positions"], H)))
    if clip:
        out += norm(f"{prefix}.pre_layrnorm")  # sic: transformers' CLIP spells it so
    for j in range(s["layers"]):
        x = f"{prefix}.encoder.layers.{j}"
        out += norm(f"{x}.layer_norm1")
        for proj in ("k", "v", "q", "out"):
            out += linear(f"{x}.self_attn.{proj}_proj", H, H)
        out += norm(f"{x}.layer_norm2") + linear(f"{x}.mlp.fc1", I, H) + linear(f"{x}.mlp.fc2", H, I)
    return out + norm(f"{prefix}.post_layernorm")
