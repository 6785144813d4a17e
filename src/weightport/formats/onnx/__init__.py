"""ONNX: a decoder graph (`model.onnx`) whose weights are ONNX external data (`model.onnx.data`),
so no 2 GB protobuf limit applies and nothing is split; beside it config.json, the tokenizer and
`weightport_onnx.json`, the manifest `weightport run` reads.

A LLaVA model becomes three graphs, as ONNX Runtime users of VLMs lay them out: `vision.onnx`
(pixel_values -> image_features: vision tower and projector), `embed.onnx` (input_ids ->
inputs_embeds) and `decoder.onnx` (inputs_embeds -> logits); the manifest says how they connect
(which token id the image features replace, how many per image), and the config, tokenizer and
processor files are llava-hf's, the image token added when the source has none.

Weights are streamed into the data file like any other format's tensors; the graph is built from
the plan alone (shapes and byte offsets) and never holds a weight. Reading an export back (its
initializers, by byte range) gives the hub tensors again, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...archs import Model, model_from_hf_config
from ...archs.llava import PROJECTOR, TEXT, VISION, text_arch, text_config, vision_config
from ...dtypes import parse_dtype, short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...io.source import TensorSource
from ...ops import Transpose
from ...paths import check_regular, confined
from ...rules import Rule, rename
from ...format import Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions
from ..common import find_side_files, write_hf_sidecar, write_json
from ..llava import llava_hf
from . import decoder, vision
from .external_data import ExternalDataFile, ExternalDataWriter, offsets

EMBED = TEXT + "model.embed_tokens.weight"
GRAPH, DATA, ONNX_MANIFEST = "model.onnx", "model.onnx.data", "weightport_onnx.json"
# a LLaVA export's graphs, each with its own data file
LLAVA_GRAPHS = ("vision", "embed", "decoder")
# embedding tables, stored as the hub holds them; every other matrix is a Linear weight, stored transposed
NOT_TRANSPOSED = ("embed_tokens.weight", "position_embedding.weight")


def onnx_rules(model: Model) -> list[Rule]:
    rules = []
    for name, shape in model.hub_tensors().items():
        transposed = len(shape) == 2 and not name.endswith(NOT_TRANSPOSED)
        rules.append(Rule(name, name, Transpose()) if transposed else rename(name, name))
    return rules


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise WeightportError("the onnx format needs the onnx package: pip install 'weightport[onnx]'") from None
    return onnx


class OnnxFormat(Format):
    name = "onnx"
    title = "ONNX (model.onnx + external data model.onnx.data; decoders, optional KV cache)"
    archs = decoder.ARCHS + ("llava",)

    def detect(self, path: Path) -> bool:
        directory = path if path.is_dir() else path.parent
        return (directory / ONNX_MANIFEST).is_file() and (directory / "config.json").is_file()

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        onnx = _require_onnx()
        directory = path if path.is_dir() else path.parent
        model = model_from_hf_config(load_json(directory / "config.json"), str(directory / "config.json"))
        from .graph import ONNX_DTYPES

        torch_dtypes = {v: k for k, v in ONNX_DTYPES.items()}
        located: dict[str, dict] = {}
        manifest_path = directory / ONNX_MANIFEST
        manifest = load_json(manifest_path)
        try:
            for name, u in manifest.get("unused_weights", {}).items():
                confined(directory, u["file"], str(manifest_path))
                located.setdefault(u["file"], {})[name] = (int(u["offset"]), int(u["length"]),
                                                           tuple(int(d) for d in u["shape"]), parse_dtype(u["dtype"]))
            graph_files = [confined(directory, entry["file"], str(manifest_path))
                           for entry in manifest["graphs"].values()]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WeightportError(f"{manifest_path}: not a weightport ONNX manifest ({type(e).__name__}: {e})") from None
        for graph_path in graph_files:
            check_regular(graph_path)
            try:
                proto = onnx.load(str(graph_path), load_external_data=False)
            except Exception as e:  # protobuf's DecodeError and friends: one line, the file named
                raise WeightportError(f"{graph_path}: not a readable ONNX model ({e})") from None
            for t in proto.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue  # graph constants (rotary frequencies, shapes), not weights
                info = {e.key: e.value for e in t.external_data}
                where = info.get("location", "")
                if Path(where).name != where:
                    raise WeightportError(f"{graph_path}: tensor {t.name} points outside its directory ({where!r})")
                check_regular(confined(directory, where, f"{graph_path}: tensor {t.name}"))
                dtype = torch_dtypes.get(t.data_type)
                if dtype is None:
                    raise WeightportError(f"{graph_path}: tensor {t.name} has ONNX data type {t.data_type}, "
                                          "which weightport does not read")
                located.setdefault(where, {})[t.name] = (int(info.get("offset", 0)), int(info["length"]),
                                                         tuple(t.dims), dtype)
        files = []
        try:
            for where, entries in located.items():
                files.append(ExternalDataFile(directory / where, entries))
            source = TensorSource(files)
        except BaseException:
            for f in files:
                f.close()
            raise
        variant = " + ".join(e["file"] for e in manifest["graphs"].values()) + " + external data"
        return Checkpoint(path=path, format=self, variant=variant, model=model, source=source,
                          rules=onnx_rules(model), side_files=find_side_files(directory),
                          generation_config=_optional_json(directory / "generation_config.json"))

    def prepare(self, source: Checkpoint, options: WriteOptions) -> Checkpoint:
        return llava_hf.FORMAT.prepare(source, options) if source.model.arch.name == "llava" else source

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        _require_onnx()
        if model.arch.name == "llava":
            vision.check(model.config)
        decoder.check(text_model(model))
        return []

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        return onnx_rules(model)

    def files(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        if not tensors[0].name.startswith(VISION):
            return [OutputFile(DATA, tensors)]
        files = {g: OutputFile(f"{g}.onnx.data", []) for g in LLAVA_GRAPHS}
        for t in tensors:
            graph = ("vision" if t.name.startswith((VISION, PROJECTOR)) else
                     "embed" if t.name == EMBED else "decoder")
            files[graph].tensors.append(t)
        return list(files.values())

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return ExternalDataWriter(directory, files)

    def write_index(self, directory: Path, files: list[OutputFile], model: Model, dtype: torch.dtype,
                    options: WriteOptions) -> list[str]:
        onnx = _require_onnx()
        from .graph import Graph

        # weights no graph runs (vision layers past LLaVA's feature layer) are stored all the same, so
        # reading back gives the whole model, and located by the manifest instead of a graph: ONNX
        # Runtime warns of every unused initializer
        unused: dict[str, dict] = {}

        def graph(name: str, data: list[OutputFile]) -> Graph:
            g = Graph(name)
            for f in data:
                places = offsets(f)
                for t in f.tensors:
                    offset, length = places[t.name]
                    if name == "vision" and vision.unused(t.name, model.config):
                        unused[t.name] = {"file": f.name, "offset": offset, "length": length,
                                          "dtype": short_name(t.dtype), "shape": list(t.shape)}
                    else:
                        g.external(t.name, t.shape, t.dtype, f.name, offset, length)
            return g

        def save(g: Graph, file: str, what: str, **extra) -> tuple[str, dict]:
            onnx.save_model(g.model(f"weightport export: {what}"), str(directory / file))
            return g.name, {"file": file, "inputs": [i.name for i in g.inputs],
                            "outputs": [o.name for o in g.outputs], **extra}

        text = text_model(model)
        manifest = {"format": "weightport-onnx", "version": 1, "dtype": short_name(dtype),
                    "model": {"arch": model.arch.name, "n_layer": text.dims.n_layer, "n_kv": text.dims.n_kv,
                              "head_dim": text.dims.head_dim, "vocab": text.dims.vocab}}
        if len(files) == 1:
            g = graph("decoder", files)
            decoder.build(g, text, dtype, with_past=options.with_past)
            manifest["graphs"] = dict([save(g, GRAPH, f"{model.arch.name} decoder", with_past=options.with_past)])
            write_json(directory / ONNX_MANIFEST, manifest)
            return [GRAPH, ONNX_MANIFEST]

        by_name = {f.name.split(".")[0]: f for f in files}
        g_vision = graph("vision", [by_name["vision"]])
        vision.build(g_vision, model.config, dtype)
        g_embed = graph("embed", [by_name["embed"]])
        ids = g_embed.input("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])
        g_embed.output(g_embed.op("Gather", EMBED, ids, axis=0), "inputs_embeds", dtype,
                       ["batch_size", "sequence_length", text.dims.hidden])
        # a tied text model's head is the embedding table: its data file is the embed graph's
        g_decoder = graph("decoder", [by_name["decoder"]] + ([by_name["embed"]] if text.dims.tied else []))
        decoder.build(g_decoder, text, dtype, with_past=options.with_past, prefix=TEXT, embeds_input=True)
        manifest["graphs"] = dict([save(g_vision, "vision.onnx", "LLaVA vision tower and projector"),
                                   save(g_embed, "embed.onnx", "LLaVA token embeddings"),
                                   save(g_decoder, "decoder.onnx", "LLaVA text decoder on inputs_embeds",
                                        with_past=options.with_past)])
        manifest["image"] = {"token_id": llava_hf.image_token(model.config),
                             "tokens_per_image": vision.image_tokens(model.config),
                             "size": vision_config(model.config)["image_size"],
                             "connect": "inputs_embeds = embed(input_ids); the rows where input_ids == token_id, "
                                        "tokens_per_image per image in order, are replaced by vision(pixel_values)"}
        manifest["unused_weights"] = unused
        write_json(directory / ONNX_MANIFEST, manifest)
        return ["vision.onnx", "embed.onnx", "decoder.onnx", ONNX_MANIFEST]

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        if model.arch.name == "llava":
            return llava_hf.FORMAT.write_metadata(directory, source, model, dtype, options)
        return write_hf_sidecar(directory, source, model)


def text_model(model: Model) -> Model:
    """The decoder-only model inside (a LLaVA's text model), or the model itself."""
    if model.arch.name != "llava":
        return model
    return Model(text_arch(model.config), text_config(model.config), model.dims)


def _optional_json(path: Path) -> dict | None:
    return load_json(path) if path.is_file() else None

FORMAT = OnnxFormat()
