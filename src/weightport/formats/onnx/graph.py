"""A small builder for ONNX graphs whose weights live in an external data file.

Nodes are added by op name and return their output's name; constants are small initializers
stored in the graph itself. Weights are never loaded here: `external` makes a TensorProto that
only points at an offset of the data file the streaming writer has filled.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 18

ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64,
               torch.int32: TensorProto.INT32, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
               torch.bool: TensorProto.BOOL}


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._constants: dict[tuple, str] = {}

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        """Adds a node; returns its output name (or a tuple of them when outputs > 1)."""
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self._count}_{op_type}", **attrs))
        return outs[0] if outputs == 1 else tuple(outs)

    def const(self, value, dtype=np.int64) -> str:
        """A constant of a numpy or torch dtype (torch for what numpy lacks: bfloat16)."""
        if isinstance(dtype, torch.dtype):
            t = torch.tensor(value, dtype=dtype)
            raw = t.view(torch.int16) if dtype == torch.bfloat16 else t
            key = (str(dtype), tuple(t.shape), raw.numpy().tobytes())
            make = lambda name: helper.make_tensor(name, ONNX_DTYPES[dtype], list(t.shape), key[2], raw=True)  # noqa: E731
        else:
            array = np.asarray(value, dtype=dtype)
            key = (array.dtype.str, array.shape, array.tobytes())
            make = lambda name: numpy_helper.from_array(array, name)  # noqa: E731
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(make(name))
            self._constants[key] = name
        return self._constants[key]

    def external(self, name: str, shape, dtype: torch.dtype, location: str, offset: int, length: int) -> str:
        tensor = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def has(self, name: str) -> bool:
        return any(i.name == name for i in self.initializers)

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _elem(dtype), shape))
        return name

    def output(self, value: str, name: str, dtype, shape) -> str:
        self.op("Identity", value, name=name)
        self.outputs.append(helper.make_tensor_value_info(name, _elem(dtype), shape))
        return name

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="weightport", doc_string=doc)
        model.ir_version = 8  # what opset 18 needs; older runtimes refuse newer IR versions
        return model


def _elem(dtype) -> int:
    return ONNX_DTYPES[dtype] if isinstance(dtype, torch.dtype) else dtype
