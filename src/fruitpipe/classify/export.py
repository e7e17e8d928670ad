"""One ONNX file that answers "which fruit is this?": the backbone, the PCA projection when the classifier reads
reduced vectors, and the classifier's layers, ending in class probabilities; and its reader."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe import images, jsonio
from fruitpipe.classify.fruits import species_name
from fruitpipe.classify.openset import species_proba
from fruitpipe.classify.stats import transform
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import DEFAULT_MAX_PIXELS

#: Output tensor of the exported graph: (N, classes) probabilities.
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Head:
    """What follows the backbone: an optional projection (dim x k, no centring, as Spark's PCAModel), then dense
    layers (weight in x out, bias), sigmoid between them, softmax at the end."""

    projection: np.ndarray | None
    layers: list[tuple[np.ndarray, np.ndarray]]
    #: The feature transform before everything (classify.stats.transform): none, l2 or sqrt_l2.
    transform: str = "none"

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, classes) from (N, dim) embeddings, in numpy: the same arithmetic as the exported graph's head."""
        x = transform(np.asarray(features, np.float64), self.transform)
        if self.projection is not None:
            x = x @ self.projection
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = 1.0 / (1.0 + np.exp(-x))
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)


def read_head(onnx_bytes: bytes) -> tuple[Head, list[str]]:
    """The head and class names of an exported classifier, read back from its initializers and metadata (needs
    the onnx package): lets the embeddings of an output be classified without decoding a photo again."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise FruitpipeError("reading the classifier's head needs onnx: pip install onnx") from None
    model = onnx.load_model_from_string(onnx_bytes)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
               if t.name.startswith("fp_")}
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    while f"fp_w{len(layers)}" in weights:
        layers.append((weights[f"fp_w{len(layers)}"], weights[f"fp_b{len(layers)}"]))
    meta = {p.key: p.value for p in model.metadata_props}
    if not layers or "classes" not in meta:
        raise FruitpipeError("this ONNX file is not a classifier written by `fruitpipe train`")
    return Head(weights.get("fp_pca_components"), layers, meta.get("transform", "none")), json.loads(meta["classes"])


def logistic_head(coefficients: np.ndarray, intercepts: np.ndarray, projection: np.ndarray | None) -> Head:
    """Spark's multinomial LogisticRegressionModel: coefficientMatrix (classes x d) and interceptVector."""
    return Head(projection, [(np.asarray(coefficients, np.float64).T, np.asarray(intercepts, np.float64))])


def mlp_head(layer_sizes: list[int], weights: np.ndarray, projection: np.ndarray | None) -> Head:
    """Spark's MultilayerPerceptronClassificationModel: its flat weight vector holds, per layer, an out x in
    matrix in column-major order (Breeze) followed by the out biases."""
    layers, offset = [], 0
    for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        w = np.asarray(weights[offset:offset + n_in * n_out], np.float64).reshape(n_in, n_out)
        offset += n_in * n_out
        layers.append((w, np.asarray(weights[offset:offset + n_out], np.float64)))
        offset += n_out
    if offset != len(weights):
        raise ValueError(f"{len(weights)} MLP weights do not match the layers {layer_sizes}")
    return Head(projection, layers)


def export(backbone: bytes, feature_output: str, head: Head, metadata: dict[str, Any]) -> bytes:
    """The backbone graph with the head appended: same input (224x224 RGB NHWC, pixel/127.5-1), output
    `probabilities`; `metadata` (classes, embedding model sha256, ...) goes into the file's metadata_props."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise FruitpipeError("exporting the classifier needs onnx: pip install onnx") from None

    outputs, classes = int(head.layers[-1][0].shape[1]), len(metadata.get("classes", []))
    if outputs != classes:  # a class the model cannot answer, or an answer without a name
        raise ValueError(f"the classifier has {outputs} outputs for {classes} listed classes")
    model = onnx.load_model_from_string(backbone)
    graph = model.graph
    x = feature_output
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    if head.transform in ("sqrt_l2", "l2"):
        if head.transform == "sqrt_l2":  # sqrt of max(x, 0), as classify.stats.transform
            nodes += [helper.make_node("Relu", [x], ["fp_relu"]), helper.make_node("Sqrt", ["fp_relu"], ["fp_sqrt"])]
            x = "fp_sqrt"
        # x / norm, a zero vector kept zero (the norm floored at a tiny value); ReduceL2's axes is an attribute
        # up to opset 17 (the registered backbones are opset 13) and an input from 18 (a custom model's).
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        reduce = (helper.make_node("ReduceL2", [x], ["fp_norm"], axes=[1], keepdims=1) if opset < 18 else
                  helper.make_node("ReduceL2", [x, "fp_norm_axes"], ["fp_norm"], keepdims=1))
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.array([1], np.int64), "fp_norm_axes"))
        nodes += [reduce,
                  helper.make_node("Max", ["fp_norm", const("fp_norm_floor", np.array(1e-30))], ["fp_norm_safe"]),
                  helper.make_node("Div", [x, "fp_norm_safe"], ["fp_unit"])]
        x = "fp_unit"
    elif head.transform != "none":
        raise ValueError(f"unknown transform {head.transform!r}")
    if head.projection is not None:
        nodes.append(helper.make_node("MatMul", [x, const("fp_pca_components", head.projection)], ["fp_reduced"]))
        x = "fp_reduced"
    for i, (w, b) in enumerate(head.layers):
        nodes.append(helper.make_node("MatMul", [x, const(f"fp_w{i}", w)], [f"fp_mm{i}"]))
        nodes.append(helper.make_node("Add", [f"fp_mm{i}", const(f"fp_b{i}", b)], [f"fp_z{i}"]))
        x = f"fp_z{i}"
        if i < len(head.layers) - 1:
            nodes.append(helper.make_node("Sigmoid", [x], [f"fp_a{i}"]))
            x = f"fp_a{i}"
    nodes.append(helper.make_node("Softmax", [x], [PROBABILITIES], axis=1))
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    n_classes = head.layers[-1][1].shape[0]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT, [None, n_classes]))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else jsonio.dumps(value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def input_metadata(spec: Any) -> dict[str, Any]:
    """How the exported file's input is fed (the backbone's): size, pixel scaling, layout; in its metadata."""
    return {"input": f"uint8 RGB photo -> {spec.input_size}x{spec.input_size}, preprocess {spec.preprocess}, "
                     f"{spec.layout.upper()} float32",
            "input_size": str(spec.input_size), "preprocess": spec.preprocess, "layout": spec.layout}


class FruitClassifier:
    """The exported file at run time (onnxruntime only: no Spark, no Java): image bytes -> top-k classes, through
    the batch pipeline's own decode and preprocessing (fruitpipe.images)."""

    def __init__(self, onnx_bytes: bytes, threads: int = 0, crop: str | None = None) -> None:
        import onnxruntime as ort

        #: How a photo that is not square is fed (images.CROPS): the same in `serve` and `evaluate`.
        self.crop = crop or images.DEFAULT_CROP

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.classes: list[str] = json.loads(meta["classes"])
        self.metadata = meta
        # Files written before these keys existed: species from the package's table, no "not sure" threshold.
        names = json.loads(meta["species"]) if "species" in meta else [species_name(c) for c in self.classes]
        self.species_names = sorted(set(names))
        self.species = np.array([self.species_names.index(s) for s in names], dtype=np.int64)
        #: Classes learned from other sources' photos (train --also) -> the Fruits-360 classes they stand for.
        self.maps_to: dict[str, list[str]] = json.loads(meta.get("maps_to", "{}"))
        threshold = json.loads(meta.get("not_sure_below", "null"))
        self.not_sure_below: float | None = None if threshold is None else float(threshold)
        self.input_name = self.session.get_inputs()[0].name
        # Files written before these keys existed are the registered backbones: 224, tf, NHWC.
        self.input_size = int(meta.get("input_size") or self.session.get_inputs()[0].shape[1] or 224)
        self.preprocess = meta.get("preprocess", "tf")
        self.layout = meta.get("layout", "nhwc")

    def model_input(self, image: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """One photo's input for this file, through the batch pipeline's decode and preprocessing; raises
        images.Rejected for a photo that cannot be used."""
        return images.model_input(image, self.input_size, max_pixels, self.preprocess, self.layout, self.crop)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) for a batch of model_input() arrays."""
        return self.session.run([PROBABILITIES], {self.input_name: batch})[0]

    def photo_probabilities(self, image: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """(classes,) for one photo: the mean over the views of its crop (one view unless crop is "three");
        raises images.Rejected for a photo that cannot be used."""
        views = images.model_views(image, self.input_size, max_pixels, self.preprocess, self.layout, self.crop)
        return self.probabilities(views).mean(axis=0)

    def answer(self, p: np.ndarray, k: int = 5) -> dict[str, Any]:
        """One photo's answer from its class probabilities: the species first (probabilities summed over its
        classes), the top-k classes (varieties) second, and "not sure" when the top species' probability is under
        the threshold `train` chose."""
        sp = species_proba(p[None], self.species, len(self.species_names))[0]
        order = np.argsort(-sp)[:k]
        best = np.argsort(-p)[:k]
        top_p = float(sp[order[0]])
        return {"species": [{"name": self.species_names[i], "probability": round(float(sp[i]), 6)} for i in order],
                "top5": [{"label": self.classes[i], "probability": round(float(p[i]), 6)} for i in best],
                "not_sure": self.not_sure_below is not None and top_p < self.not_sure_below,
                "not_sure_below": self.not_sure_below}

    def top(self, image: bytes, k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, float]]:
        """The k most probable classes of one image; an image that cannot be used raises images.Rejected."""
        p = self.photo_probabilities(image, max_pixels)
        best = np.argsort(-p)[:k]
        return [(self.classes[i], float(p[i])) for i in best]
