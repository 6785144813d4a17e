"""ONNX: a decoder graph (`model.onnx`) whose weights are ONNX external data (`model.onnx.data`),
so no 2 GB protobuf limit applies and nothing is split; beside it config.json, the tokenizer and
`weightport_onnx.json`, the manifest `weightport run` reads.

Weights are streamed into the data file like any other format's tensors; the graph is built from
the plan alone (shapes and byte offsets) and never holds a weight. Reading an export back (its
initializers, by byte range) gives the hub tensors again, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...archs import Model, model_from_hf_config
from ...dtypes import short_name
from ...errors import WeightportError
from ...hf_config import load_json
from ...io.source import TensorSource
from ...ops import Transpose
from ...rules import Rule, rename
from ..base import (Checkpoint, Format, OutputFile, OutputTensor, Writer, WriteOptions, find_side_files,
                    write_hf_sidecar, write_json)
from . import decoder
from .external_data import ExternalDataFile, ExternalDataWriter, offsets

GRAPH, DATA, MANIFEST = "model.onnx", "model.onnx.data", "weightport_onnx.json"
# stored as the hub holds them; every other matrix is a Linear weight, stored transposed
NOT_TRANSPOSED = ("embed_tokens.weight",)


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
    archs = decoder.ARCHS

    def detect(self, path: Path) -> bool:
        directory = path if path.is_dir() else path.parent
        return (directory / GRAPH).is_file() and (directory / "config.json").is_file()

    def open(self, path: Path, layout: str | None = None) -> Checkpoint:
        onnx = _require_onnx()
        directory = path if path.is_dir() else path.parent
        model = model_from_hf_config(load_json(directory / "config.json"), str(directory / "config.json"))
        try:
            proto = onnx.load(str(directory / GRAPH), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends: one line, the file named
            raise WeightportError(f"{directory / GRAPH}: not a readable ONNX model ({e})") from None
        from .graph import ONNX_DTYPES

        torch_dtypes = {v: k for k, v in ONNX_DTYPES.items()}
        located: dict[str, dict] = {}
        for t in proto.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue  # graph constants (rotary frequencies, shapes), not weights
            info = {e.key: e.value for e in t.external_data}
            where = info.get("location", "")
            if Path(where).name != where:
                raise WeightportError(f"{directory / GRAPH}: tensor {t.name} points outside its directory ({where!r})")
            dtype = torch_dtypes.get(t.data_type)
            if dtype is None:
                raise WeightportError(f"{directory / GRAPH}: tensor {t.name} has ONNX data type {t.data_type}, "
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
        return Checkpoint(path=path, format=self, variant="model.onnx + external data", model=model, source=source,
                          rules=onnx_rules(model), side_files=find_side_files(directory),
                          generation_config=_optional_json(directory / "generation_config.json"))

    def check_write(self, model: Model, options: WriteOptions) -> list[str]:
        _require_onnx()
        decoder.check(model)
        return []

    def target_rules(self, model: Model, layout: str | None = None, tp: int = 1) -> list[Rule]:
        return onnx_rules(model)

    def layout(self, tensors: list[OutputTensor], options: WriteOptions) -> list[OutputFile]:
        return [OutputFile(DATA, tensors)]

    def writer(self, directory: Path, files: list[OutputFile]) -> Writer:
        return ExternalDataWriter(directory, files)

    def write_index(self, directory: Path, files: list[OutputFile], model: Model, dtype: torch.dtype,
                    options: WriteOptions) -> list[str]:
        onnx = _require_onnx()
        from .graph import Graph

        g = Graph("decoder")
        (data,) = files
        for t in data.tensors:
            offset, length = offsets(data)[t.name]
            g.external(t.name, t.shape, t.dtype, data.name, offset, length)
        decoder.build(g, model, dtype, with_past=options.with_past)
        onnx.save_model(g.model(f"weightport export of a {model.arch.name} decoder"), str(directory / GRAPH))
        write_json(directory / MANIFEST, {
            "format": "weightport-onnx", "version": 1, "dtype": short_name(dtype),
            "graphs": {"decoder": {"file": GRAPH, "data": DATA, "inputs": [i.name for i in g.inputs],
                                   "outputs": [o.name for o in g.outputs], "with_past": options.with_past}},
            "model": {"arch": model.arch.name, "n_layer": model.dims.n_layer, "n_kv": model.dims.n_kv,
                      "head_dim": model.dims.head_dim, "vocab": model.dims.vocab},
        })
        return [GRAPH, MANIFEST]

    def write_metadata(self, directory: Path, source: Checkpoint, model: Model, dtype: torch.dtype,
                       options: WriteOptions) -> list[str]:
        return write_hf_sidecar(directory, source, model)


def _optional_json(path: Path) -> dict | None:
    return load_json(path) if path.is_file() else None

FORMAT = OnnxFormat()
