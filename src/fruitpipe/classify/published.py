"""What `train` publishes and what reads it: the classifier's names, the exported file read back checked against
the commit record (serve, evaluate, drift), and the checks train makes before and after fitting (the photos are
still there; the exported file answers as the fit does)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from fruitpipe import images, storage
from fruitpipe.classify import export as export_mod
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import content_id
from fruitpipe.layout import CLASSIFIER
from fruitpipe.output import RunDir

log = logging.getLogger(__name__)

CLASSIFIER_DIR = CLASSIFIER
ONNX_NAME = "fruit_classifier.onnx"
#: Test photos run through the exported file at the end of training, to prove it answers as Spark does.
EXPORT_CHECK_IMAGES = 64


class TrainError(FruitpipeError):
    """Training cannot start or finish; the message says what to do."""


def read_classifier(output: str) -> bytes:
    """OUTPUT's exported classifier, checked against the sha256 the commit record names (serve, evaluate, drift):
    a file from an interrupted publish, or replaced by hand, is refused in one line."""
    rundir = RunDir(output)
    uri = rundir.join(CLASSIFIER_DIR, ONNX_NAME)
    try:
        where, want = rundir.classifier_uri(ONNX_NAME)  # a publish interrupted after its record: the hidden file
        data = storage.read_bytes(where)
    except FileNotFoundError:
        raise TrainError(f"{uri} does not exist: run `fruitpipe train {output}` first") from None
    except OSError as exc:  # an endpoint that does not answer, refused credentials: pyarrow's message, one line
        raise TrainError(f"could not read {uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         "; check the credentials and --s3-endpoint") from None
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise TrainError(f"{uri} is not the classifier the commit record names (a train was interrupted while "
                         f"publishing, or the file was replaced): run `fruitpipe train {output}` again")
    return data


def recorded_ids(files: list[str]) -> dict[str, str]:
    """uri -> content id (sha256 of the bytes `run` embedded) of the output's embeddings."""
    ids: dict[str, str] = {}
    for part in files:
        table = storage.read_parquet(part, columns=["uri", "id"])
        ids.update(zip(table.column("uri").to_pylist(), table.column("id").to_pylist()))
    return ids


def probe_photos(files: list[str], probes: int = 8) -> None:
    """Refuse in one line, before any fit, when the output's photos are gone or all changed since `run` (the export
    check reads some and compares the classifier with Spark on them: changed bytes would give another answer)."""
    if not files:
        return
    try:
        table = storage.read_parquet(files[0], columns=["uri", "id"]).slice(0, probes)
    except Exception:  # a damaged part: the fit's own read names it in one line
        return
    uris, ids = table.column("uri").to_pylist(), table.column("id").to_pylist()
    if not uris:
        return
    if not any(storage.exists(u) for u in uris):
        raise TrainError(f"the photos this output was made from are not where `run` found them (e.g. {uris[0]}): "
                         "train checks its exported file on some of them; put them back (or run again from where "
                         "they are now) and train again")
    same = 0
    for uri, want in zip(uris, ids):
        try:
            same += content_id(storage.read_object(uri)) == want
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            continue
    if not same:
        raise TrainError(f"the photos this output was made from have changed since `run` embedded them (e.g. "
                         f"{uris[0]}: other bytes): train checks its exported file on some of them; run `fruitpipe "
                         "run` again on the photos as they are now (it embeds what changed), then train")


def check_export(onnx_bytes: bytes, uris: list[str], proba: np.ndarray,
                 ids: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the exported file on up to EXPORT_CHECK_IMAGES test photos that can still be read (the output holds the
    embeddings, not the photos): its top-1 must be Spark's on each. Photos moved since the run, or changed (their
    bytes no longer the content id `ids` records), are skipped and counted; with none left the file is not written
    (train refuses before fitting when it can tell)."""
    clf = export_mod.FruitClassifier(onnx_bytes)
    order: np.ndarray = np.linspace(0, max(len(uris) - 1, 0), num=len(uris), dtype=int)
    order = np.concatenate([order[:: max(1, len(uris) // EXPORT_CHECK_IMAGES)], order])
    picked: list[int] = []
    inputs: list[np.ndarray] = []
    missing = changed = 0
    for tried, i in enumerate(dict.fromkeys(int(j) for j in order)):  # spread over the test rows, then any
        if len(picked) == EXPORT_CHECK_IMAGES or tried == 8 * EXPORT_CHECK_IMAGES:
            break
        try:
            data = storage.read_object(uris[i])
            if ids is not None and uris[i] in ids and images.content_id(data) != ids[uris[i]]:
                changed += 1  # other bytes than `run` embedded: not a check of the export
                continue
            inputs.append(clf.model_input(data))
            picked.append(i)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            missing += 1
        except images.Rejected:  # changed since it was embedded: not a check of the export
            changed += 1
    if uris and not picked:
        raise TrainError(f"none of the {len(uris)} test photos can be read as `run` embedded them any more (e.g. "
                         f"{uris[0]}; {missing} missing, {changed} changed): the exported {ONNX_NAME} cannot be "
                         "checked, not written; put the photos back where `run` found them, or run again")
    idx = np.array(picked, dtype=int)
    got = clf.probabilities(np.stack(inputs)) if len(idx) else np.zeros((0, proba.shape[1]))
    same = int(np.sum(np.argmax(got, axis=1) == np.argmax(proba[idx], axis=1))) if len(idx) else 0
    worst = float(np.max(np.abs(got - proba[idx]))) if len(idx) else 0.0
    if same != len(idx):
        raise TrainError(f"the exported {ONNX_NAME} disagrees with Spark on {len(idx) - same} of {len(idx)} test "
                         "photos: not written (a bug; please report it)")
    if missing or changed:
        log.warning("export check: %d test photo(s) missing and %d changed since `run`; checked on %d", missing,
                    changed, len(idx))
    return {"images": len(idx), "same_top1": same, "max_abs_probability_diff": round(worst, 6),
            "photos_unreadable": missing, "photos_changed": changed}
