"""The model's pixel scaling moved into its graph: any float image model wrapped, once, to take uint8 NHWC RGB, so
decoding hands it the bytes it decoded (no float32 copy in Python: a quarter of the memory traffic, and of the
bytes copied to a GPU)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fruitpipe.images import MEAN_255, STD_255
from fruitpipe.models.registry import ModelSpec

#: Input tensor of every wrapped model: uint8 [N, size, size, 3], RGB.
UINT8_INPUT = "pixels_uint8"


@dataclass(frozen=True)
class Wrapped:
    """A wrapped model: its bytes, their sha256 (what worker sessions are cached by) and its input name."""

    data: bytes
    sha256: str
    input_name: str = UINT8_INPUT


def wrap_uint8(model_bytes: bytes, spec: ModelSpec) -> Wrapped:
    """`model_bytes` with a uint8 NHWC input in front: Cast to float, then the spec's scaling with the same float32
    operations as images.preprocess (tf: / 127.5 - 1; torch: - mean*255, / std*255; raw: none), then a transpose
    for NCHW models, feeding the original input. Works for float32 and QDQ int8 graphs alike."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    original = next((i for i in graph.input if i.name == spec.input_name), None)
    if original is None:
        raise ValueError(f"the model has no input {spec.input_name!r}")
    consts: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    nodes = [helper.make_node("Cast", [UINT8_INPUT], ["fp_u8_float"], to=TensorProto.FLOAT)]
    x = "fp_u8_float"
    steps: list[tuple[str, str]] = []
    if spec.preprocess == "tf":
        steps = [("Div", const("fp_u8_scale", np.array(127.5))), ("Sub", const("fp_u8_one", np.array(1.0)))]
    elif spec.preprocess == "torch":
        steps = [("Sub", const("fp_u8_mean", MEAN_255)), ("Div", const("fp_u8_std", STD_255))]
    elif spec.preprocess != "raw":
        raise ValueError(f"unknown preprocessing {spec.preprocess!r}")
    for i, (op, operand) in enumerate(steps):
        nodes.append(helper.make_node(op, [x, operand], [f"fp_u8_step{i}"]))
        x = f"fp_u8_step{i}"
    if spec.layout == "nchw":
        nodes.append(helper.make_node("Transpose", [x], ["fp_u8_nchw"], perm=[0, 3, 1, 2]))
        x = "fp_u8_nchw"
    nodes.append(helper.make_node("Identity", [x], [spec.input_name]))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    graph.initializer.extend(consts)
    graph.input.remove(original)
    size = spec.input_size
    graph.input.insert(0, helper.make_tensor_value_info(UINT8_INPUT, TensorProto.UINT8, ["n", size, size, 3]))
    data = model.SerializeToString()
    return Wrapped(data, hashlib.sha256(data).hexdigest())
