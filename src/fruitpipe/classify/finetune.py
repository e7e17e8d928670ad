"""Fine-tuning MobileNetV2's last blocks together with the head on labelled photos (JAX on the CPU, the optional
`[finetune]` extra): the frozen trunk runs in onnxruntime, the tail (the last inverted-residual blocks and Conv_1)
and the head learn in JAX from the published weights, and the result is written back through the project's own
graph builder, so the exported classifier is the same single ONNX file as `train`'s."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fruitpipe import images
from fruitpipe.errors import ConfigError
from fruitpipe.models import build_mobilenet_v2 as mnv2

log = logging.getLogger(__name__)

#: The last block index of MobileNetV2 (expanded_conv_16) and the model's input size.
LAST_BLOCK = len(mnv2.BLOCKS)
SIZE = mnv2.INPUT_SIZE


@dataclass(frozen=True)
class FinetuneSettings:
    """How a fine-tuning runs: which blocks learn, for how long, on which views; deterministic by seed."""

    #: The last `blocks` inverted-residual blocks and Conv_1 learn (BatchNorm statistics stay frozen). Measured on
    #: the shared sample + the Grocery Store train split, scored on its val split (docs/real-photos.md): 2 blocks,
    #: 6 epochs at 3e-4 gave 80.0 % through `train --finetune` (81.8 % in a bench run; linear head 76.4 %), Test
    #: 97.58 %, on an AVX-512 VM (84.5 %, Test 97.65 %, with the same seed on an AVX2 one); 3 blocks, 8 epochs at
    #: 5e-4 gave 79.1 %, Test 96.8 % (bench); 8 views and 8 epochs 79.1 % (AVX2). Not tuned further: the val split
    #: (110 photos) is too small to tune on.
    blocks: int = 2
    epochs: int = 6
    #: Augmented views made of each photo (each epoch uses one; cached as trunk activations).
    views: int = 4
    batch: int = 64
    learning_rate: float = 3e-4
    #: Epochs at the start during which only the head learns: none when it starts from train's linear head.
    head_epochs: int = 0
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 7

    def validate(self) -> FinetuneSettings:
        if not 1 <= self.blocks <= 4:
            raise ConfigError(f"--finetune-blocks {self.blocks} must be from 1 to 4 (the last blocks that learn)")
        if not 1 <= self.epochs <= 100:
            raise ConfigError(f"--finetune-epochs {self.epochs} must be from 1 to 100")
        if not 1 <= self.views <= 16:
            raise ConfigError(f"views {self.views}: the augmented views per photo must be from 1 to 16")
        return self


def cut_name(blocks: int) -> str:
    """The trunk's last tensor when the last `blocks` blocks learn: the output of block LAST_BLOCK - blocks."""
    i = LAST_BLOCK - blocks
    expansion, channels, stride = mnv2.BLOCKS[i - 1]
    prev = mnv2.BLOCKS[i - 2][1] if i >= 2 else 16
    return f"expanded_conv_{i}/add" if stride == 1 and prev == channels else f"expanded_conv_{i}_project/out"


def _tail_layers(blocks: int) -> list[tuple[str, str, bool, bool, int]]:
    """(scope, kernel name, depthwise, relu6, stride) of each conv of the tail, in order."""
    out = []
    for i in range(LAST_BLOCK - blocks + 1, LAST_BLOCK + 1):
        s, stride = f"expanded_conv_{i}", mnv2.BLOCKS[i - 1][2]
        out += [(f"{s}_expand", f"{s}_expand_weights", False, True, 1),
                (f"{s}_depthwise", f"{s}_depthwise_depthwise_weights", True, True, stride),
                (f"{s}_project", f"{s}_project_weights", False, False, 1)]
    return out + [("Conv_1", "Conv_1_weights", False, True, 1)]


def _residual(blocks: int) -> list[bool]:
    """Whether each tail block adds its input (stride 1, same channels)."""
    out = []
    for i in range(LAST_BLOCK - blocks + 1, LAST_BLOCK + 1):
        _, channels, stride = mnv2.BLOCKS[i - 1]
        out.append(stride == 1 and mnv2.BLOCKS[i - 2][1] == channels)
    return out


def trunk_model(load: mnv2.Loader, blocks: int) -> bytes:
    """The published backbone built by the project's builder, ending at the tail's input."""
    import onnx
    from onnx import helper

    model = onnx.load_model_from_string(mnv2.build_features_model(load))
    cut = cut_name(blocks)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(cut, onnx.TensorProto.FLOAT, None))
    return onnx.utils.Extractor(model).extract_model(["input"], [cut]).SerializeToString()


# ---- augmentation: what a phone photo of a shop shelf varies in (deterministic by seed, photo and view) ----

def view_rng(seed: int, content_id: str, view: int) -> np.random.Generator:
    """The generator of one view of one photo: the same view on any machine."""
    return np.random.default_rng([seed, int(content_id[:16], 16), view])


def augmented(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One training view (SIZE x SIZE x 3 uint8): a random resized crop (35-100 % of the area, aspect 3/4-4/3), a
    horizontal flip half the time, brightness, contrast, saturation and hue jitter, and a blur a third of the
    time."""
    h, w = rgb.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.35, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(h, w)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(rgb).crop((x0, y0, x0 + cw, y0 + ch)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-8, 9))) % 256
    img = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < 1 / 3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return np.asarray(img, dtype=np.uint8)


@dataclass
class Photos:
    """Labelled photos: their bytes' content ids, class indices and decoded RGB (kept for the views)."""

    ids: list[str]
    y: np.ndarray
    rgb: list[np.ndarray]


def decode(items: Sequence[tuple[str, bytes, int]], max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Photos:
    """(content id, bytes, class) -> Photos; a photo that cannot be used is skipped and counted in the log."""
    ids, ys, rgbs, bad = [], [], [], 0
    for cid, data, y in items:
        try:
            rgb = images.decode_rgb(data, max_pixels, min_side=images.MIN_SIDE)
        except images.Rejected:
            bad += 1
            continue
        h, w = rgb.shape[:2]
        if max(h, w) > 2 * SIZE:  # keep memory small; the crops are taken from this copy
            f = 2 * SIZE / max(h, w)
            rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                         Image.Resampling.BILINEAR))
        ids.append(cid)
        ys.append(y)
        rgbs.append(rgb)
    if bad:
        log.warning("fine-tuning: %d photo(s) could not be decoded and were left out", bad)
    return Photos(ids, np.array(ys, np.int32), rgbs)


def trunk_features(session: Any, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    """The trunk's activations, NHWC (the builder's graph computes in NCHW), float16 to halve the cache, of float
    model inputs, a batch at a time."""
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: inputs[i:i + batch]})[0].transpose(0, 2, 3, 1).astype(np.float16)
           for i in range(0, len(inputs), batch)]
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


def make_views(session: Any, photos: Photos, views: int, seed: int,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(views, photos, h, w, c) trunk activations of `views` augmented views of each photo; view 0 of a photo is
    the same on every call with the same seed."""
    out = []
    for v in range(views):
        acts = []
        for start in range(0, len(photos.ids), 64):
            chunk = range(start, min(start + 64, len(photos.ids)))
            x = images.preprocess(np.stack([augmented(photos.rgb[i], view_rng(seed, photos.ids[i], v))
                                            for i in chunk]))
            acts.append(trunk_features(session, x))
            if progress is not None:
                progress(len(chunk))
        out.append(np.concatenate(acts))
    return np.stack(out)


def center_views(session: Any, photos: Sequence[bytes],
                 max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[int]]:
    """The trunk's activations of each photo's centre view, made by `images.model_views` from its bytes (the path
    `serve` and `evaluate` feed the exported file), and the indices of the photos kept: one that cannot be used
    (images.Rejected) is left out."""
    acts, kept = [], []
    for start in range(0, len(photos), 64):
        x = []
        for i in range(start, min(start + 64, len(photos))):
            try:
                x.append(images.model_views(photos[i], SIZE, max_pixels, "tf", "nhwc", "center")[0])
            except images.Rejected:
                continue
            kept.append(i)
        if x:
            acts.append(trunk_features(session, np.stack(x)))
    return (np.concatenate(acts) if acts else np.zeros((0,), np.float16)), kept


# ---- the tail and the head in JAX ----

def init_params(load: mnv2.Loader, blocks: int, classes: int, head: tuple[np.ndarray, np.ndarray] | None
                ) -> dict[str, Any]:
    """Trainable parameters (published kernels, BatchNorm gamma and beta; a head) and the frozen BatchNorm
    statistics, as float32 numpy."""
    params: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for scope, kernel, _, _, _ in _tail_layers(blocks):
        params[kernel] = np.asarray(load(kernel), np.float32)
        params[f"{scope}_BatchNorm_gamma"] = np.asarray(load(f"{scope}_BatchNorm_gamma"), np.float32)
        params[f"{scope}_BatchNorm_beta"] = np.asarray(load(f"{scope}_BatchNorm_beta"), np.float32)
        frozen[f"{scope}_BatchNorm_moving_mean"] = np.asarray(load(f"{scope}_BatchNorm_moving_mean"), np.float32)
        frozen[f"{scope}_BatchNorm_moving_variance"] = np.asarray(load(f"{scope}_BatchNorm_moving_variance"),
                                                                  np.float32)
    w, b = head if head is not None else (np.zeros((mnv2.FEATURES, classes), np.float32),
                                          np.zeros(classes, np.float32))
    params["head_w"], params["head_b"] = np.asarray(w, np.float32), np.asarray(b, np.float32)
    return {"params": params, "frozen": frozen}


def _forward(params: dict[str, Any], frozen: dict[str, Any], x: Any, blocks: int) -> tuple[Any, Any]:
    """(features after Conv_1 and pooling, logits) of trunk activations x (N, h, w, c), in JAX."""
    import jax.numpy as jnp
    from jax import lax

    layers = _tail_layers(blocks)
    residual = _residual(blocks)

    def conv_bn(x: Any, scope: str, kernel: str, depthwise: bool, relu6: bool, stride: int) -> Any:
        k = params[kernel]
        if depthwise:  # published as (kh, kw, C, 1): HWIO with I = 1 and one group per channel
            k = jnp.transpose(k, (0, 1, 3, 2))
        # "SAME" as TensorFlow pads (the odd pixel after), which the builder's pads reproduce
        y = lax.conv_general_dilated(x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=x.shape[-1] if depthwise else 1)
        scale = params[f"{scope}_BatchNorm_gamma"] / jnp.sqrt(frozen[f"{scope}_BatchNorm_moving_variance"]
                                                              + mnv2.BN_EPSILON)
        y = (y - frozen[f"{scope}_BatchNorm_moving_mean"]) * scale + params[f"{scope}_BatchNorm_beta"]
        return jnp.clip(y, 0.0, 6.0) if relu6 else y

    x = x.astype(jnp.float32)
    for b in range(blocks):
        y = x
        for layer in layers[3 * b:3 * b + 3]:
            y = conv_bn(y, *layer)
        x = x + y if residual[b] else y
    x = conv_bn(x, *layers[-1])
    feats = x.mean(axis=(1, 2))
    # sqrt then unit norm (classify.stats.transform "sqrt_l2"), with a gradient that stays finite at 0
    pos = feats > 1e-12
    z = jnp.where(pos, jnp.sqrt(jnp.where(pos, feats, 1.0)), 0.0)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-30)
    return feats, z @ params["head_w"] + params["head_b"]


@dataclass
class Result:
    """A fine-tuned tail and head: the parameters (numpy), and the loss of each epoch."""

    params: dict[str, np.ndarray]
    frozen: dict[str, np.ndarray]
    blocks: int
    losses: list[float]
    seconds: float


def fit(state: dict[str, Any], views: np.ndarray, y: np.ndarray, classes: int, settings: FinetuneSettings,
        weights: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> Result:
    """Fine-tune the tail and head on trunk activations `views` (views, N, h, w, c) of labels `y`: Adam with
    decoupled weight decay on the kernels, cosine-decayed learning rate, label smoothing, the head alone for the
    first `head_epochs`; each epoch visits every photo once, in an order and with a view fixed by the seed."""
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    params = {k: jnp.asarray(v) for k, v in state["params"].items()}
    frozen = {k: jnp.asarray(v) for k, v in state["frozen"].items()}
    weights = np.ones(len(y), np.float32) if weights is None else np.asarray(weights, np.float32)
    n = len(y)
    steps_per_epoch = max(1, -(-n // settings.batch))
    total = steps_per_epoch * settings.epochs
    smooth = settings.label_smoothing

    def loss_fn(p: dict[str, Any], x: Any, t: Any, wt: Any) -> Any:
        _, logits = _forward(p, frozen, x, settings.blocks)
        target = jax.nn.one_hot(t, classes) * (1 - smooth) + smooth / classes
        nll = -(target * jax.nn.log_softmax(logits)).sum(axis=1)
        return (nll * wt).sum() / wt.sum()

    def step(p: dict[str, Any], m: dict[str, Any], v: dict[str, Any], i: Any, x: Any, t: Any, wt: Any,
             head_only: Any) -> tuple[Any, Any, Any, Any]:
        loss, g = jax.value_and_grad(loss_fn)(p, x, t, wt)
        lr = settings.learning_rate * 0.5 * (1 + jnp.cos(jnp.pi * i / total))
        new_p, new_m, new_v = {}, {}, {}
        for k in p:
            gk = g[k] * (1.0 if k.startswith("head") else 1.0 - head_only)
            new_m[k] = 0.9 * m[k] + 0.1 * gk
            new_v[k] = 0.999 * v[k] + 0.001 * gk * gk
            mh, vh = new_m[k] / (1 - 0.9 ** (i + 1)), new_v[k] / (1 - 0.999 ** (i + 1))
            decay = settings.weight_decay * p[k] if (k.endswith("_weights") or k == "head_w") else 0.0
            upd = lr * (mh / (jnp.sqrt(vh) + 1e-8) + decay)
            new_p[k] = p[k] - upd * (1.0 if k.startswith("head") else 1.0 - head_only)
        return new_p, new_m, new_v, loss

    step_jit = jax.jit(step)
    m = {k: jnp.zeros_like(v) for k, v in params.items()}
    v2 = {k: jnp.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(settings.seed)
    losses = []
    i = 0
    for epoch in range(settings.epochs):
        order = rng.permutation(n)
        view = epoch % views.shape[0]
        total_loss = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * settings.batch:(s + 1) * settings.batch]
            if len(idx) < settings.batch:  # one shape for the compiled step: pad with repeats of weight 0
                pad = settings.batch - len(idx)
                idx_full = np.concatenate([idx, idx[:1].repeat(pad)])
                wt = np.concatenate([weights[idx], np.zeros(pad, np.float32)])
            else:
                idx_full, wt = idx, weights[idx]
            params, m, v2, loss = step_jit(params, m, v2, jnp.asarray(i, jnp.float32),
                                           jnp.asarray(views[view, idx_full]), jnp.asarray(y[idx_full]),
                                           jnp.asarray(wt), jnp.asarray(float(epoch < settings.head_epochs)))
            total_loss += float(loss) * len(idx)
            i += 1
            if progress is not None:
                progress(len(idx))
        losses.append(total_loss / n)
        log.info("fine-tuning: epoch %d of %d, loss %.4f", epoch + 1, settings.epochs, losses[-1])
    return Result({k: np.asarray(val) for k, val in params.items()}, {k: np.asarray(val) for k, val in
                                                                      frozen.items()},
                  settings.blocks, losses, time.perf_counter() - t0)


def predict(result: Result, acts: np.ndarray, batch: int = 128) -> np.ndarray:
    """Class probabilities of trunk activations, in JAX (what the exported file must give)."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(lambda p, x: jax.nn.softmax(_forward(p, result.frozen, x, result.blocks)[1]))
    params = {k: jnp.asarray(v) for k, v in result.params.items()}
    out = [np.asarray(fwd(params, jnp.asarray(acts[i:i + batch]))) for i in range(0, len(acts), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(result.params["head_b"])), np.float32)


def tuned_loader(load: mnv2.Loader, result: Result) -> mnv2.Loader:
    """The published weights with the fine-tuned ones in their place (same names, same layouts), for the
    project's graph builder."""
    def tuned(name: str) -> np.ndarray:
        return result.params[name] if name in result.params else load(name)

    return tuned


def export_backbone(load: mnv2.Loader, result: Result) -> bytes:
    """The fine-tuned backbone, built by the project's builder (same graph, tensor names and input)."""
    return mnv2.build_features_model(tuned_loader(load, result))
