"""Benchmark: does fine-tuning the backbone's last block on phone-like variants of the studio photos move real-photo
accuracy where a linear head on frozen features stops (issue 23)? CPU only; needs torch (not a fruitpipe
dependency: `pip install torch --index-url https://download.pytorch.org/whl/cpu`).

    FRUITPIPE_MODELS=../shared/models python bench/finetune.py OUT REAL_DIR FAMILIES [--variants 2] [--epochs 6]

OUT: an output of `fruitpipe run` on Fruits-360 photos (Training + Test); REAL_DIR: labelled real photos in family
folders, FAMILIES its families.json. The MobileNetV2 ONNX file is cut after block 15 (7x7x160): the frozen trunk
runs once per image in onnxruntime (each Training photo, its --variants variants made by fruitpipe.augment with
seed 7 as `train --augment` makes them, the Test photos, the real photos, center crop), and the rest (block 16,
Conv_1, the pooling: 0.88 M weights, batch norm folded as in the file) is rebuilt in torch from the file's own
weights (checked: the same features to 1e-3 from the cut stored in float16) and trained with a linear head on the
square-root, L2-normed features (train's transform), by cross-entropy: the head alone for 2 epochs, then with
block 16 and Conv_1 for the rest (AdamW, a fixed schedule declared here, never chosen on the real photos).
Printed per epoch: seconds, Fruits-360 Test top-1, real-photo family top-1 (the top class one of the family's
classes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fruitpipe import augment, images  # noqa: E402

PREFIX = "model/mobilenetv2_1.00_224/"
CUT = PREFIX + "block_15_add/add:0"


def _trunk_session(model_path: Path):
    """onnxruntime session of the file with the cut tensor as a second output."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model_path))
    m.graph.output.append(onnx.helper.make_tensor_value_info(CUT, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), m


def _weights(m) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _tail(m):
    """block 16 + Conv_1 + ReLU6 + global average pooling in torch, from the ONNX file's fused weights."""
    import torch
    from torch import nn

    w = _weights(m)

    def conv(name: str, cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Conv2d:
        c = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
        c.weight.data = torch.from_numpy(w[PREFIX + name + "_weights_fused_bn"].copy())
        c.bias.data = torch.from_numpy(w[PREFIX + name + "_bias_fused_bn"].copy())
        return c

    relu6 = nn.Hardtanh(0.0, 6.0)
    return nn.Sequential(conv("block_16_expand/Conv2D", 160, 960), relu6,
                         conv("block_16_depthwise/depthwise", 960, 960, 3, 960), relu6,
                         conv("block_16_project/Conv2D", 960, 320), conv("Conv_1/Conv2D", 320, 1280), relu6,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _trunk(session, inputs: list, cache: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(cut activations float16, features) of model inputs made by the callables `inputs`; cached by name."""
    path = cache / f"{name}.npz"
    if path.exists():
        z = np.load(path)
        return z["cut"], z["feat"]
    cuts, feats = [], []
    for i in range(0, len(inputs), 64):
        x = np.stack([f() for f in inputs[i:i + 64]])
        feat, cut = session.run(["features", CUT], {"input": x})
        cuts.append(cut.astype(np.float16))
        feats.append(feat)
    cut, feat = np.concatenate(cuts), np.concatenate(feats)
    np.savez(path, cut=cut, feat=feat)
    return cut, feat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("real", type=Path)
    parser.add_argument("families", type=Path)
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = Path(os.environ.get("FRUITPIPE_MODELS", ROOT.parent / "shared" / "models")) / "mobilenet_v2_features.onnx"
    session, onnx_model = _trunk_session(model)
    cache = Path("/tmp/fruitpipe-bench-finetune")
    cache.mkdir(exist_ok=True)
    df = pd.read_parquet(args.out / "embeddings", columns=["id", "uri", "label", "split"])
    tr, te = df[df.split == "Training"].reset_index(drop=True), df[df.split == "Test"].reset_index(drop=True)
    classes = sorted(tr.label.unique())
    families = json.loads(args.families.read_text())
    real = sorted((p.parent.name, p) for p in args.real.glob("*/*") if p.parent.name in families)

    def photo(uri: str):
        return lambda: images.model_input(Path(uri).read_bytes(), 224, 10**8)

    def variant(uri: str, cid: str, k: int):
        def make() -> np.ndarray:
            rgb = images.decode_rgb(Path(uri).read_bytes(), 10**8)
            made = augment.phone_like(rgb, augment.variant_rng(7, cid, k))
            return images.preprocess(images.square_views(made, 224)[0])
        return make

    t0 = time.perf_counter()
    c_tr, f_tr = _trunk(session, [photo(u) for u in tr.uri], cache, "training")
    c_var, f_var = _trunk(session, [variant(u, c, k) for u, c in zip(tr.uri, tr.id) for k in range(args.variants)],
                          cache, f"variants-{args.variants}")
    c_te, _ = _trunk(session, [photo(u) for u in te.uri], cache, "test")
    c_real, _ = _trunk(session, [photo(str(p)) for _, p in real], cache, "real")
    trunk_s = time.perf_counter() - t0
    tail = _tail(onnx_model)
    with torch.no_grad():
        got = tail(torch.from_numpy(c_tr[:64].astype(np.float32))).numpy()
    check = float(np.abs(got - f_tr[:64]).max())
    print(f"trunk: {len(c_tr) + len(c_var) + len(c_te) + len(c_real)} images in {trunk_s:.0f} s; torch tail vs "
          f"ONNX features: max abs diff {check:.2e} (float16 cut)", flush=True)
    y_tr = np.array([classes.index(c) for c in tr.label])
    y = torch.from_numpy(np.concatenate([y_tr, np.repeat(y_tr, args.variants)]))
    x = torch.from_numpy(np.concatenate([c_tr, c_var]))
    y_te = np.array([classes.index(c) for c in te.label])
    right = np.array([[c in families[fam] for c in classes] for fam, _ in real])
    head = nn.Linear(1280, len(classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    def logits(cut: torch.Tensor) -> torch.Tensor:
        f = torch.sqrt(tail(cut.float()).clamp_min(0) + 1e-12)
        return head(f / f.norm(dim=1, keepdim=True) * 30.0)

    def evaluate() -> tuple[float, float]:
        tail.eval()
        with torch.no_grad():
            p_te = np.concatenate([logits(torch.from_numpy(c_te[i:i + 256])).argmax(1).numpy()
                                   for i in range(0, len(c_te), 256)])
            p_re = np.concatenate([logits(torch.from_numpy(c_real[i:i + 256])).argmax(1).numpy()
                                   for i in range(0, len(c_real), 256)])
        return float(np.mean(p_te == y_te)), float(np.mean(right[np.arange(len(p_re)), p_re]))

    rows = []
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(args.epochs):
        joint = epoch >= 2
        for p in tail.parameters():
            p.requires_grad = joint
        if epoch in (0, 2):
            params = [{"params": head.parameters(), "lr": 1e-2 if not joint else 2e-3}]
            if joint:
                params.append({"params": tail.parameters(), "lr": 2e-4})
            opt = torch.optim.AdamW(params, weight_decay=1e-4)
        t1 = time.perf_counter()
        tail.train()
        order = torch.randperm(len(y))
        total = 0.0
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            loss = loss_fn(logits(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        test_top1, real_top1 = evaluate()
        row = {"epoch": epoch + 1, "tail_trained": joint, "seconds": round(time.perf_counter() - t1, 1),
               "loss": round(total / len(y), 4), "test_top1": round(test_top1, 5),
               "real_family_top1": round(real_top1, 5)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": os.cpu_count(), "variants": args.variants,
                                         "training_rows": int(len(y)), "trunk_seconds": round(trunk_s, 1),
                                         "tail_check_max_abs_diff": check, "epochs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
