"""Any ONNX image model: a small NCHW, torch-preprocessed model built with onnx.helper runs the whole pipeline;
a wrong rank, size, layout or output name is one line naming the flag to change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import copy_classes, sample_classes
from fruitpipe import images
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.cli import main

SIZE = 32


def _model(path: Path) -> Path:
    """pixels [N, 3, 32, 32] -> Conv 3x3 (8 filters) -> ReLU -> global average pool -> embedding [N, 8]; a second
    output (logits [N, 2]) so that --output has to choose."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["pixels", "w"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(8, 2)).astype(np.float32), "head")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                             [None, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, 8]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2])], inits)
    return _save(graph, path)


def _flat_model(path: Path) -> Path:
    """A model that reads rows of numbers, not images: input [N, 96, 32] -> mean over the last axis."""
    graph = helper.make_graph([helper.make_node("ReduceMean", ["rows"], ["embedding"], axes=[2], keepdims=0)],
                              "flat", [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 96, SIZE])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, 96])])
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_a_torch_style_nchw_model_runs_the_whole_pipeline(tmp_path: Path, spark) -> None:
    model = _model(tmp_path / "tiny.onnx")
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Training",), per_split=15)
    out = tmp_path / "out"
    assert main(["run", str(data), str(out), "--model-path", str(model), "--input-size", str(SIZE),
                 "--preprocess", "torch", "--layout", "nchw", "--output", "embedding", "--k", "4", "-q"]) == 0
    report = json.loads((out / "run.json").read_text())
    assert report["counts"]["embedded"] == 30 and report["counts"]["accounted"]
    assert report["model"]["name"] == "custom" and report["model"]["dim"] == 8
    assert report["model"]["spec"] == {"filename": "tiny.onnx", "sha256": report["model"]["sha256"], "dim": 8,
                                       "input_size": SIZE, "input_name": "pixels", "output_name": "embedding",
                                       "preprocess": "torch", "layout": "nchw"}
    # the features are the model's on each photo, fed as torch expects: (pixel/255 - mean)/std, channels first
    emb = pq.read_table(out / "embeddings").sort_by("uri")
    uris = emb.column("uri").to_pylist()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    decoded = images.decode_rgb(Path(uris[0]).read_bytes(), 10**8, size_hint=SIZE)  # as the pipeline decodes
    rgb = images.resize_rgb(decoded, SIZE).astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((rgb - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    expected = session.run(["embedding"], {"pixels": x})[0][0]
    np.testing.assert_allclose(emb.column("features")[0].as_py(), expected, rtol=1e-4, atol=1e-5)
    assert {len(v) for v in pq.read_table(out / "reduced").column("pca").to_pylist()} == {4}
    # later commands read the spec from the output: a refit with another k needs no model flags
    assert main(["reduce", str(out), "--k", "3", "-q"]) == 0
    assert json.loads((out / "run.json").read_text())["pca"]["k"] == 3
    # a classifier on top takes photos the same way (torch scaling, channels first), read from its own metadata
    assert main(["train", str(out), "--model-path", str(model), "-q", "--folds", "2", "--no-pca-table"]) == 0
    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    assert (clf.input_size, clf.preprocess, clf.layout) == (SIZE, "torch", "nchw")
    assert clf.top(Path(uris[0]).read_bytes(), k=1)[0][0] in sample_classes(2)
    assert main(["train", str(out), "-q", "--folds", "2", "--no-pca-table"]) == 2  # the file is needed
    # the same command again embeds nothing
    assert main(["run", str(data), str(out), "--model-path", str(model), "--input-size", str(SIZE),
                 "--preprocess", "torch", "--layout", "nchw", "--output", "embedding", "--k", "3", "-q"]) == 0
    assert json.loads((out / "run.json").read_text())["counts"]["embedded_this_run"] == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--input-size", "64", "--layout", "nchw", "--output", "embedding"],
     "takes 32x32 images, not 64x64: use --input-size 32"),
    (["--layout", "nhwc", "--output", "embedding"], "has 32 channels, not 3: use --layout nchw"),
    (["--output", "probabilities"], "choose the embedding output with --output, one of embedding, logits "
                                    "('probabilities' is not one)"),
    (["--layout", "nchw"], "choose the embedding output with --output, one of embedding, logits"),
    (["--preprocess", "torch", "--output", "embedding", "--k", "9"], "--k 9 exceeds the embedding size 8"),
])
def test_a_wrong_description_is_one_line(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    model = _model(tmp_path / "tiny.onnx")
    data = copy_classes(tmp_path / "in", sample_classes(1), splits=("Training",), per_split=2)
    assert main(["run", str(data), str(tmp_path / "out"), "--model-path", str(model), *flags, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # refused before the output was touched


def test_a_model_of_the_wrong_rank_or_without_a_file_is_one_line(tmp_path: Path, capsys) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), splits=("Training",), per_split=2)
    flat = _flat_model(tmp_path / "flat.onnx")
    assert main(["run", str(data), str(tmp_path / "out"), "--model-path", str(flat), "--output", "embedding"]) == 2
    assert "has rank 3" in capsys.readouterr().err
    assert main(["run", str(data), str(tmp_path / "out"), "--preprocess", "torch"]) == 2
    assert "add --model-path FILE.onnx" in capsys.readouterr().err
