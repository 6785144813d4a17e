"""xtuner LLaVA training checkpoints (read only): `iter_N.pth` as mmengine saves it (the state dict
plain or under `state_dict`, beside optimizer and logging state), or the DeepSpeed ZeRO directory
`iter_N.pth/` that `xtuner train --deepspeed` writes. See ../../../shared/formats/llava.md §2.

xtuner's LLaVAModel saves only what training changed: `projector.model.{0,2}.*` always,
`llm.*` and `visual_encoder.*` only when those were trained. The configs are not in the
checkpoint at all (they are in the training config's model ids), so `--llm DIR` and
`--visual-encoder DIR` name the base checkpoints: their configs describe the network, and their
tensors fill in whatever the checkpoint lacks. The plan says how many tensors came from where.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from ...archs.llava import TEXT
from ...errors import WeightportError
from ...io import open_files
from .zero import is_zero_checkpoint, open_zero_checkpoint
from ...io.parts import PartsSource
from ...rules import Rule
from . import parts as llava_parts
from ...format import Checkpoint, Format
from ..common import find_side_files
from ..hf import FORMAT as HF, _weight_files
from .parts import IMAGE_PROCESSOR

LLM, VISUAL, PROJ = "llm.", "visual_encoder.", "projector."
LORA = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "base_model.model.")


class XtunerPthFormat(Format):
    name = "xtuner"
    title = "xtuner LLaVA training checkpoint (iter_N.pth file or DeepSpeed ZeRO-2/3 directory; read only)"
    archs = ()
    read_only_archs = ("llava",)
    takes_bases = True

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return is_zero_checkpoint(path)
        return path.suffix in (".pth", ".pt") and zipfile.is_zipfile(path) and _has_projector(path)

    def open(self, path: Path, layout: str | None = None, bases: dict[str, Path] | None = None,
             lora_alpha: float | None = None) -> Checkpoint:
        bases = bases or {}
        missing = [f for f in ("llm", "visual_encoder") if f not in bases]
        if missing:
            flags = " and ".join(f"--{f.replace('_', '-')}" for f in missing)
            raise WeightportError(f"{path}: an xtuner training checkpoint holds no configs; pass {flags} with the "
                                  "base checkpoints named in the training config (llm_name_or_path, "
                                  "visual_encoder_name_or_path)")
        own = open_zero_checkpoint(path) if path.is_dir() else open_files([path])
        try:
            lora_names = [n for n in own.tensors if any(m in n for m in LORA)]
            if lora_names and lora_alpha is None:
                raise WeightportError(f"{path}: holds LoRA weights ({lora_names[0]}, ...) but not their alpha, which is "
                                      "in the training config (llm_lora=dict(..., lora_alpha=...)); pass --lora-alpha")
            ckpt = self._open(path, own, bases, set(lora_names))
            if lora_names:
                ckpt = _merge_training_lora(ckpt, path, lora_names, float(lora_alpha))
            return ckpt
        except BaseException:
            own.close()
            raise

    def _open(self, path: Path, own, bases: dict[str, Path], lora_names: set[str]) -> Checkpoint:
        names = [n for n in own.tensors if n not in lora_names]
        unknown = next((n for n in names if not n.startswith((LLM, VISUAL, PROJ))), None)
        if unknown is not None:
            raise WeightportError(f"{path}: tensor {unknown} is not part of xtuner's LLaVAModel (expected llm.*, "
                                  "visual_encoder.* or projector.model.*)")
        depth = {n.split(".")[2] for n in names if n.startswith(PROJ + "model.")}
        if depth != {"0", "2"}:
            raise WeightportError(f"{path}: projector layers {sorted(depth)}; LLaVA-1.5 formats hold exactly 2 "
                                  "linear layers (projector.model.0 and projector.model.2)")
        llm_dir, vision_dir = Path(bases["llm"]), Path(bases["visual_encoder"])
        text = HF.open(llm_dir)
        try:
            vision_files, _, _ = _weight_files(vision_dir)
            vision_cfg = llava_parts.clip_vision_config(vision_dir / "config.json")
            bias = f"{PROJ}model.0.bias" in own.tensors
            model = llava_parts.hub_model(text.model.config, vision_cfg, projector_bias=bias, where=str(path))
            vision = open_files(vision_files)
        except BaseException:
            text.close()
            raise
        source = PartsSource({"": own, "llm-base/": text.source, "vision-base/": vision}, {})
        counts = {"llm": [0, 0], "vision": [0, 0]}
        rules = []
        for r in text.rules:  # the base's own names, and the checkpoint's under llm.
            hub = tuple(TEXT + h for h in r.hub)
            in_ckpt = [LLM + h for h in r.hub]
            if len(r.hub) == 1 and in_ckpt[0] in own.tensors:
                rules.append(Rule(hub, in_ckpt[0]))
                counts["llm"][0] += 1
            else:
                rules.append(Rule(hub, tuple(f"llm-base/{f}" for f in r.fmt), r.op))
                counts["llm"][1] += 1
        base_names = [n.removeprefix("vision-base/") for n in source.tensors if n.startswith("vision-base/")]
        ckpt_prefix = llava_parts.vision_prefix(names, VISUAL)
        base_prefix = "vision-base/" + llava_parts.vision_prefix(base_names)
        for r in llava_parts.vision_rules(model, ""):
            stored = ckpt_prefix + r.fmt[0]
            if stored in own.tensors:
                rules.append(Rule(r.hub, stored))
                counts["vision"][0] += 1
            else:
                rules.append(Rule(r.hub, base_prefix + r.fmt[0]))
                counts["vision"][1] += 1
        rules += llava_parts.projector_rules(model, (f"{PROJ}model.0", f"{PROJ}model.2"))
        llava_parts.check_widths(model, {n: m.shape for n, m in source.tensors.items()},
                                 {r.hub[0]: r.fmt[0] for r in rules}, str(path))
        notes = [f"language model: {counts['llm'][0]} tensors from the checkpoint, {counts['llm'][1]} from --llm {llm_dir}",
                 f"vision encoder: {counts['vision'][0]} tensors from the checkpoint, {counts['vision'][1]} from "
                 f"--visual-encoder {vision_dir}",
                 "projector: from the checkpoint"]
        # base tensors the checkpoint replaces are left out; a CLIPModel base's text tower is dropped
        claimed = {f for r in rules for f in r.fmt}
        replaced = {f"llm-base/{f}" for r in text.rules for f in r.fmt} | \
                   {base_prefix + r.fmt[0] for r in llava_parts.vision_rules(model, "")}
        source.hide((replaced - claimed) | lora_names)
        dropped = {f"llm-base/{k}": v for k, v in text.dropped.items()}
        dropped.update({n: "not part of LLaVA's vision tower (CLIP text tower, projections)" for n in source.tensors
                        if n.startswith("vision-base/") and n not in claimed})
        side = [p for p in find_side_files(llm_dir) if p.suffix != ".py"]
        if (vision_dir / IMAGE_PROCESSOR).is_file():
            side.append(vision_dir / IMAGE_PROCESSOR)
        return Checkpoint(path=path, format=self, variant=getattr(own, "variant", "single file"),
                          model=model, source=source, rules=rules, side_files=side, notes=notes, dropped=dropped,
                          generation_config=text.generation_config)


def _has_projector(path: Path) -> bool:
    """Whether a torch zip's pickle names xtuner's projector keys (read from the pickle bytes alone)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            return pkl is not None and b"projector.model.0.weight" in z.read(pkl)
    except (OSError, zipfile.BadZipFile):
        return False


FORMAT = XtunerPthFormat()


_TRAINING_LORA = re.compile(r"^(?P<part>llm|visual_encoder)\.base_model\.model\.(?P<module>.+)"
                            r"\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _merge_training_lora(ckpt: Checkpoint, path: Path, names: list[str], alpha: float) -> Checkpoint:
    """The LoRA weights xtuner's LLaVAModel saves for a LoRA-trained LLM or ViT, merged with scale
    alpha / r (r from lora_A's rows)."""
    from ...adapters import Adapter, Delta, merge
    from .xtuner_llava import _vision_hub_name

    pairs: dict[str, dict[str, str]] = {}
    for n in names:
        m = _TRAINING_LORA.match(n)
        if m is None:
            raise WeightportError(f"{path}: tensor {n} is a LoRA weight weightport does not merge (only lora_A / "
                                  "lora_B of linear layers)")
        pairs.setdefault(f"{m['part']}.{m['module']}", {})[m["ab"]] = n
    # a second reader of the same file, narrowed to the LoRA weights, is the adapter's source
    source = PartsSource({"": open_zero_checkpoint(path) if path.is_dir() else open_files([path])}, {})
    source.hide(set(source.tensors) - set(names))
    deltas = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            source.close()
            raise WeightportError(f"{path}: {module} has lora_{''.join(ab)} without its pair")
        r = source.tensors[ab["A"]].shape[0]
        deltas.append(Delta(module, ab["A"], ab["B"], alpha / r, transpose=False))

    def hub(name: str) -> str:
        part, _, rest = name.partition(".")
        return TEXT + rest if part == "llm" else _vision_hub_name(rest)

    return merge(ckpt, Adapter(path, source, deltas), 1.0, hub)
