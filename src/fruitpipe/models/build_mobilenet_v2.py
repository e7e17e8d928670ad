"""MobileNetV2 (alpha 1.0, 224, ImageNet) as an ONNX graph built with numpy and `onnx` from the published `.npy`
weights of the TF-slim checkpoint: no TensorFlow, no converter, the same tensor names as the registry's file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

#: BatchNorm epsilon of the TF-slim / Keras MobileNetV2 (the weights folder's SOURCES.md).
BN_EPSILON = 1e-3
#: Input size and output width of the features model.
INPUT_SIZE = 224
FEATURES = 1280
#: ONNX opset and IR version of the registry's files (MODELS.md: opset 13, IR 7), so any onnxruntime >= 1.17 runs it.
OPSET = 13
IR_VERSION = 7

#: The inverted-residual blocks after `Conv` and `expanded_conv`: (expansion, output channels, stride).
#: Strides 2 at blocks 1, 3, 6 and 13, as in the paper's table 2 and the weights' SOURCES.md.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)

Loader = Callable[[str], np.ndarray]


def folder_loader(folder: str | Path) -> Loader:
    """Read `<folder>/<name>.npy` (float32, as published; never pickled objects)."""
    root = Path(folder)

    def load(name: str) -> np.ndarray:
        return np.load(root / f"{name}.npy", allow_pickle=False)

    return load


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after, output size); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _Graph:
    """Collects nodes and initializers while the network is laid down layer by layer."""

    def __init__(self, load: Loader) -> None:
        self.load = load
        self.nodes: list = []
        self.inits: list = []
        self.used: set[str] = set()

    def weight(self, name: str) -> np.ndarray:
        self.used.add(name)
        return np.asarray(self.load(name), dtype=np.float64)

    def conv_bn(self, x: str, size: int, scope: str, kernel_name: str, stride: int, depthwise: bool,
                relu6: bool) -> tuple[str, int]:
        """Conv (or depthwise conv) + folded BatchNorm (+ ReLU6); returns the output tensor and spatial size."""
        from onnx import helper, numpy_helper

        w = self.weight(kernel_name)  # HWIO, or HWC1 for depthwise
        gamma, beta = self.weight(f"{scope}_BatchNorm_gamma"), self.weight(f"{scope}_BatchNorm_beta")
        mean, var = self.weight(f"{scope}_BatchNorm_moving_mean"), self.weight(f"{scope}_BatchNorm_moving_variance")
        scale = gamma / np.sqrt(var + BN_EPSILON)  # float64 throughout, rounded to float32 once: CPU-independent
        if depthwise:
            kernel = np.transpose(w, (2, 3, 0, 1)) * scale[:, None, None, None]  # (C, 1, kh, kw)
            group = w.shape[2]
        else:
            kernel = np.transpose(w, (3, 2, 0, 1)) * scale[:, None, None, None]  # (O, I, kh, kw)
            group = 1
        bias = beta - mean * scale
        k = w.shape[0]
        before, after, out = _same_pads(size, k, stride)
        wname, bname, y = f"{scope}/kernel", f"{scope}/bias", f"{scope}/out"
        self.inits += [numpy_helper.from_array(kernel.astype(np.float32), wname),
                       numpy_helper.from_array(bias.astype(np.float32), bname)]
        self.nodes.append(helper.make_node("Conv", [x, wname, bname], [y], name=f"{scope}/Conv", group=group,
                                           kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[before, before, after, after], dilations=[1, 1]))
        if relu6:
            self.nodes.append(helper.make_node("Clip", [y, "relu6/min", "relu6/max"], [f"{scope}/relu6"],
                                               name=f"{scope}/Relu6"))
            y = f"{scope}/relu6"
        return y, out

    def block(self, x: str, size: int, index: int, expansion: int, channels: int, stride: int,
              in_channels: int) -> tuple[str, int]:
        """One inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes keep."""
        from onnx import helper

        scope = "expanded_conv" if index == 0 else f"expanded_conv_{index}"
        y = x
        if expansion != 1:
            y, _ = self.conv_bn(y, size, f"{scope}_expand", f"{scope}_expand_weights", 1, False, True)
        y, out = self.conv_bn(y, size, f"{scope}_depthwise", f"{scope}_depthwise_depthwise_weights", stride, True,
                              True)
        y, _ = self.conv_bn(y, out, f"{scope}_project", f"{scope}_project_weights", 1, False, False)
        if stride == 1 and in_channels == channels:
            self.nodes.append(helper.make_node("Add", [x, y], [f"{scope}/add"], name=f"{scope}/Add"))
            y = f"{scope}/add"
        return y, out


def build_features_model(load: Loader, input_name: str = "input", output_name: str = "features") -> bytes:
    """The serialized ONNX features model: NHWC float32 [N, 224, 224, 3] in [-1, 1] -> [N, 1280] (Conv_1, BN,
    ReLU6, global average pooling), as MODELS.md describes `mobilenet_v2_features.onnx`. Deterministic: the same
    weights give the same bytes on any CPU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = _Graph(load)
    g.inits += [numpy_helper.from_array(np.array(0.0, np.float32), "relu6/min"),
                numpy_helper.from_array(np.array(6.0, np.float32), "relu6/max")]
    g.nodes.append(helper.make_node("Transpose", [input_name], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
    x, size = g.conv_bn("nchw", INPUT_SIZE, "Conv", "Conv_weights", 2, False, True)
    x, size = g.block(x, size, 0, 1, 16, 1, 32)
    channels = 16
    for i, (expansion, out_channels, stride) in enumerate(BLOCKS, start=1):
        x, size = g.block(x, size, i, expansion, out_channels, stride, channels)
        channels = out_channels
    x, size = g.conv_bn(x, size, "Conv_1", "Conv_1_weights", 1, False, True)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="avg_pool"))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], [output_name], name="flatten", axis=1))
    graph = helper.make_graph(
        g.nodes, "mobilenet_v2_1.0_224_features",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", INPUT_SIZE, INPUT_SIZE, 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", FEATURES])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fruitpipe.models.build_mobilenet_v2", producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = ("MobileNetV2 1.0 224 (TF-slim ImageNet checkpoint), features only, BatchNorm folded; built "
                        "from JonathanCMitchell/mobilenet_v2_keras@8ab6f54432a37061766a94cf0388908e72cb12cb/weights")
    onnx.checker.check_model(model)
    return model.SerializeToString()
