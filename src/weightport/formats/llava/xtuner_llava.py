"""xtuner's LLaVA directory, as `xtuner convert pth_to_hf --save-format xtuner` lays it out: the
language model's own Hugging Face checkpoint at the root (its native architecture: Phi-3, Llama,
...), `projector/` (xtuner's ProjectorModel: `model.0` / `model.2` linears, a remote-code config)
and `visual_encoder/` (a CLIPVisionModel). See ../../../shared/formats/llava.md §2.3.

pth_to_hf leaves out the parts training froze, so a directory may lack the root model or
`visual_encoder/`; `--llm DIR` / `--visual-encoder DIR` name the base checkpoints that complete it,
and the plan says which part came from where.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import adapters
from ...archs import Model
from ...archs.llava import TEXT, projector_bias, vision_sizes
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...io import open_files
from ...io.parts import PartsSource
from ...rules import Rule
from . import parts as llava_parts
from . import projector_code as xtuner_projector_code
from .parts import IMAGE_PROCESSOR
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import copy_side_files, find_side_files, write_json
from ..hf import FORMAT as HF, ShardedSafetensorsWriter, _weight_files
from ..peft.read import read_peft

PROJECTOR_DIR, VISION_DIR = "projector", "visual_encoder"
LLM_ADAPTER, VISION_ADAPTER = "llm_adapter", "visual_encoder_adapter"


def _open_llm(path: Path) -> Checkpoint:
    if not (path / "config.json").is_file():
        raise WeightportError(f"{path}: no config.json (expected the language model's Hugging Face checkpoint)")
    return HF.open(path)


def _open_parts(where: Path, llm: Path, vision: Path, projector_files: list[Path],
                bias: bool) -> tuple[Model, PartsSource, list[Rule], Checkpoint]:
    """The llava hub model and source of a language model directory, a CLIP vision directory and
    xtuner projector weights."""
    text = _open_llm(llm)
    try:
        vision_files, _, _ = _weight_files(vision)
        vision_cfg = llava_parts.clip_vision_config(vision / "config.json")
        model = llava_parts.hub_model(text.model.config, vision_cfg, projector_bias=bias, where=str(where))
        parts = {"llm/": text.source, "vision/": open_files(vision_files), "projector/": open_files(projector_files)}
    except BaseException:
        text.close()
        raise
    source = PartsSource(parts, {})
    rules = [Rule(tuple(TEXT + h for h in r.hub), tuple(f"llm/{f}" for f in r.fmt), r.op) for r in text.rules]
    names = [n.removeprefix("vision/") for n in source.tensors if n.startswith("vision/")]
    rules += llava_parts.vision_rules(model, "vision/" + llava_parts.vision_prefix(names))
    rules += llava_parts.projector_rules(model, tuple(f"projector/{n}" for n in llava_parts.XTUNER_PROJECTOR))
    llava_parts.check_widths(model, {n: m.shape for n, m in source.tensors.items()},
                             {r.hub[0]: r.fmt[0] for r in rules}, str(where))
    return model, source, rules, text


class XtunerLlavaFormat(Format):
    name = "xtuner-llava"
    title = "xtuner LLaVA directory (LLM at the root, projector/, visual_encoder/)"
    archs = ("llava",)
    takes_bases = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / PROJECTOR_DIR / "config.json").is_file()

    def open(self, path: Path, layout: str | None = None, bases: dict[str, Path] | None = None) -> Checkpoint:
        bases = bases or {}
        projector = path / PROJECTOR_DIR
        cfg = load_json(projector / "config.json")
        if cfg.get("model_type") != "projector":
            raise WeightportError(f"{projector / 'config.json'}: model_type {cfg.get('model_type')!r}, not xtuner's "
                                  "'projector'")
        bias = llava_parts.check_projector(cfg, str(projector / "config.json"))
        notes = []
        llm = self._part(path, path, "llm", bases, (path / "config.json").is_file(), notes, "language model")
        vision = self._part(path, path / VISION_DIR, "visual_encoder", bases, (path / VISION_DIR / "config.json").is_file(),
                            notes, "vision encoder")
        files, _, _ = _weight_files(projector)
        model, source, rules, text = _open_parts(path, llm, vision, files, bias)
        side = [p for p in find_side_files(llm) if p.suffix != ".py"]
        if (vision / IMAGE_PROCESSOR).is_file():
            side.append(vision / IMAGE_PROCESSOR)
        ckpt = Checkpoint(path=path, format=self, variant=f"LLM {text.model.arch.name}, CLIP vision, projector",
                          model=model, source=source, rules=rules, side_files=side, notes=notes,
                          generation_config=text.generation_config, dropped={f"llm/{k}": v for k, v in text.dropped.items()})
        # pth_to_hf saves LoRA-trained parts as unmerged PEFT adapters beside their (frozen) bases
        for adapter, prefix in ((LLM_ADAPTER, TEXT), (VISION_ADAPTER, _vision_hub_name)):
            if (path / adapter).is_dir():
                try:
                    ckpt = adapters.merge(ckpt, read_peft(path / adapter), prefix=prefix)
                except BaseException:
                    ckpt.close()
                    raise
        return ckpt

    @staticmethod
    def _part(path: Path, own: Path, flag: str, bases: dict, present: bool, notes: list, what: str) -> Path:
        base = bases.get(flag)
        if present and base is not None:
            raise WeightportError(f"{own}: holds the {what} already; --{flag.replace('_', '-')} would replace it")
        if present:
            notes.append(f"{what} from {own}")
            return own
        if base is None:
            raise WeightportError(f"{path}: has no {what} (training froze it); pass --{flag.replace('_', '-')} "
                                  "with the base checkpoint it was trained from")
        notes.append(f"{what} from --{flag.replace('_', '-')} {base}")
        return Path(base)

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        rules = [Rule(h, h.removeprefix(TEXT)) for h in model.hub_tensors() if h.startswith(TEXT)]
        rules += [Rule(r.hub, f"{VISION_DIR}/{r.fmt[0]}") for r in llava_parts.vision_rules(model, "vision_model.")]
        rules += [Rule(r.hub, f"{PROJECTOR_DIR}/{r.fmt[0]}")
                  for r in llava_parts.projector_rules(model, llava_parts.XTUNER_PROJECTOR)]
        return rules

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        by_dir: dict[str, list[OutputTensor]] = {"": [], VISION_DIR: [], PROJECTOR_DIR: []}
        for t in tensors:
            d = t.name.split("/")[0] if "/" in t.name else ""
            by_dir[d].append(t)
        files = HF.files(by_dir[""], options)
        for d in (VISION_DIR, PROJECTOR_DIR):
            files.append(OutputFile(f"{d}/model.safetensors", by_dir[d]))
        return files

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return SubdirWriter(directory, files)

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        text = llava_parts.text_part(model)
        write_json(directory / "config.json", dict(text.config, torch_dtype=short_name(dtype)))
        written = ["config.json"]
        if source.generation_config is not None:
            write_json(directory / "generation_config.json", source.generation_config)
            written.append("generation_config.json")
        side = [p for p in source.side_files if p.name != IMAGE_PROCESSOR]
        written += copy_side_files(side, directory)
        vision = dict(model.config["vision_config"], architectures=["CLIPVisionModel"], torch_dtype=short_name(dtype))
        write_json(directory / VISION_DIR / "config.json", vision)
        written.append(f"{VISION_DIR}/config.json")
        processor = [p for p in source.side_files if p.name == IMAGE_PROCESSOR]
        written += [f"{VISION_DIR}/{n}" for n in copy_side_files(processor, directory / VISION_DIR)]
        write_json(directory / PROJECTOR_DIR / "config.json", projector_config(model, dtype))
        for name, code in xtuner_projector_code.FILES.items():
            (directory / PROJECTOR_DIR / name).write_text(code)
            written.append(f"{PROJECTOR_DIR}/{name}")
        return written + [f"{PROJECTOR_DIR}/config.json"]


def _vision_hub_name(name: str) -> str:
    """A CLIPVisionModel adapter's name on the hub: transformers 4.x modules sit under vision_model.,
    5.x ones do not."""
    return "vision_tower." + (name if name.startswith("vision_model.") else f"vision_model.{name}")


def projector_config(model: Model, dtype: torch.dtype) -> dict:
    """xtuner's ProjectorConfig for this model's projector."""
    return {"architectures": ["ProjectorModel"], "model_type": "projector",
            "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                         "AutoModel": "modeling_projector.ProjectorModel"},
            "visual_hidden_size": vision_sizes(model.config)["hidden"], "llm_hidden_size": model.dims.hidden,
            "depth": 2, "hidden_act": "gelu", "bias": projector_bias(model.config), "torch_dtype": short_name(dtype)}


class SubdirWriter(Writer):
    """Sharded safetensors in the root and in subdirectories, each directory with its own index."""

    def __init__(self, directory: Path, files: list[OutputFile]):
        groups: dict[str, list[OutputFile]] = {}
        for f in files:
            sub, _, name = f.name.rpartition("/")
            groups.setdefault(sub, []).append(OutputFile(name, [OutputTensor(t.name.rpartition("/")[2], t.shape,
                                                                             t.dtype, t.alias) for t in f.tensors]))
        self._writers = {}
        for sub, group in groups.items():
            (directory / sub).mkdir(parents=True, exist_ok=True)
            self._writers[sub] = ShardedSafetensorsWriter(directory / sub, group)

    def _split(self, name: str) -> tuple[ShardedSafetensorsWriter, str]:
        sub, _, own = name.rpartition("/")
        return self._writers[sub], own

    def write_group(self, names, tensors):
        for name, tensor in zip(names, tensors):
            writer, own = self._split(name)
            writer.write_group([own], [tensor])

    def write_chunks(self, name, shape, dtype, chunks):
        writer, own = self._split(name)
        writer.write_chunks(own, shape, dtype, chunks)

    def close(self):
        for w in self._writers.values():
            w.close()

    def abort(self):
        for w in self._writers.values():
            w.abort()


FORMAT = XtunerLlavaFormat()
