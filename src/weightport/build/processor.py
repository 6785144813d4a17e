"""The tokenizer and processor files of a built Idefics3, so `AutoProcessor.from_pretrained(OUT)`
turns text and images into the ids the model expects.

The three new tokens must get ids V..V+2, the rows the build appends. A tokenizer.json can only
hold them there when the text tokenizer already has exactly V ids: the tokenizers library
renumbers an added token whose id leaves a gap (see tokenizer_files), and transformers'
Idefics3Processor adds the same three tokens at len(tokenizer) when they are missing. Any other
tokenizer is left out, with a note saying why, rather than written with ids that disagree with
the model.
"""

from __future__ import annotations

from pathlib import Path

from .. import tokenizer_files
from ..hf_config import load_json

PROCESSOR = "Idefics3Processor"
# Idefics3-8B's image processor settings (HuggingFaceM4/Idefics3-8B-Llama3 preprocessor_config.json):
# images are cut into tiles of the vision tower's size plus one global view of at most 4 tiles a side
IMAGE_PROCESSOR = {"image_processor_type": "Idefics3ImageProcessor", "processor_class": PROCESSOR,
                   "do_convert_rgb": True, "do_resize": True, "resample": 1, "do_image_splitting": True,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
TILES_PER_SIDE = 4


def write_processor(side_files: list[Path], vision_dir: Path, vocab: int, new_tokens: tuple[str, ...],
                    image_size: int, patch_size: int, scale_factor: int, workdir: Path) -> tuple[list[Path], str]:
    """Write the extended tokenizer files and the processor configs into `workdir`; returns the
    files to place beside the weights (the text model's other side files included) and a note."""
    by_name = {p.name: p for p in side_files}
    tokenizer_names = {n for n in by_name if n.startswith(("tokenizer", "special_tokens", "added_tokens",
                                                           "vocab.", "merges."))}
    others = [p for p in side_files if p.name not in tokenizer_names]
    if "tokenizer.json" not in by_name:
        why = "no tokenizer.json" if not tokenizer_names else "only a slow tokenizer (no tokenizer.json)"
        return others, (f"tokenizer and processor not written: the text model has {why}; add "
                        f"{', '.join(new_tokens)} at ids {vocab}..{vocab + len(new_tokens) - 1} yourself")
    tokenizer = load_json(by_name["tokenizer.json"])
    size = tokenizer_files.size(tokenizer)
    clash = [t for t in new_tokens if tokenizer_files.token_id(tokenizer, t) is not None]
    if clash:
        return others, f"tokenizer and processor not written: its tokenizer.json already has {clash[0]}"
    if size != vocab:
        has = "a tokenizer model weightport cannot count" if size is None else f"{size} ids"
        return others, (f"tokenizer and processor not written: its tokenizer.json has {has}, not the model's "
                        f"{vocab}, so {', '.join(new_tokens)} cannot take ids {vocab}..{vocab + len(new_tokens) - 1}")

    config = load_json(by_name["tokenizer_config.json"]) if "tokenizer_config.json" in by_name else {}
    tokenizer, config = tokenizer_files.with_tokens(tokenizer, config, list(new_tokens))
    written = [tokenizer_files.dump(workdir / "tokenizer.json", tokenizer),
               tokenizer_files.dump(workdir / "tokenizer_config.json", dict(config, processor_class=PROCESSOR))]
    if "special_tokens_map.json" in by_name:
        written.append(by_name["special_tokens_map.json"])

    seq_len = (image_size // patch_size) ** 2 // scale_factor ** 2
    image = dict(IMAGE_PROCESSOR, size={"longest_edge": TILES_PER_SIDE * image_size},
                 max_image_size={"longest_edge": image_size})
    siglip = vision_dir / "preprocessor_config.json"
    if siglip.is_file():  # the vision tower was trained with these
        image.update({k: v for k, v in load_json(siglip).items() if k in ("image_mean", "image_std")})
    written.append(tokenizer_files.dump(workdir / "preprocessor_config.json", image))
    written.append(tokenizer_files.dump(workdir / "processor_config.json",
                                        {"image_seq_len": seq_len, "processor_class": PROCESSOR}))
    return others + written, (f"tokenizer: {', '.join(new_tokens)} added at ids {vocab}..{vocab + len(new_tokens) - 1}"
                              f"; processor: {PROCESSOR}, {seq_len} tokens per image tile")
