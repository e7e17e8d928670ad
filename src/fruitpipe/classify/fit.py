"""The Spark ML side of training: labelled vector frames, the estimator with its cross-validated grid, and the
top-1 of the same classifier on PCA projections of the embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe.classify.metrics import top_k
from fruitpipe.pipeline.reduce import choose_k, project
from fruitpipe.vectors import to_list_array, to_matrix

log = logging.getLogger(__name__)

#: regParam grid of the logistic regression (L2), chosen by cross-validation on Training only.
LOGREG_GRID = (1e-4, 1e-3, 1e-2)
#: Hidden-layer widths tried for the MLP (one hidden layer, sigmoid, as Spark's MultilayerPerceptronClassifier).
MLP_GRID = (128, 256)
#: The PCA sizes of the comparison table (plus the fewest components reaching 95 % of the variance).
PCA_TABLE_K = (20, 50)
PCA_TABLE_VARIANCE = 0.95


def labelled(df: Any, classes: list[str]) -> Any:
    """(uri, split, label, y, features vector): y is the class's index in `classes` (-1 for a class not in it)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    index = F.array_position(F.array(*[F.lit(c) for c in classes]), F.col("label")) - 1
    # The class count given explicitly (Spark ML reads it from the label's metadata): otherwise it is inferred
    # from the largest label present, one fewer when the last class has no Training row.
    nominal = {"ml_attr": {"name": "y", "type": "nominal", "vals": list(classes)}}
    return df.select("id", "uri", "split", "label", index.cast("double").alias("y", metadata=nominal),
                     array_to_vector(F.col("features")).alias("features"))


def projected(df: Any, components: np.ndarray) -> Any:
    """The embeddings frame with `features` replaced by features @ components (pipeline.reduce.project, the
    same projection the batch job and the exported file use)."""
    comps = components

    def apply(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            reduced = to_list_array(project(to_matrix(b.column(b.schema.get_field_index("features"))), comps))
            yield pa.RecordBatch.from_arrays([b.column(i) if n != "features" else reduced
                                              for i, n in enumerate(b.schema.names)], names=b.schema.names)

    return df.mapInArrow(apply, df.schema)


def estimator(kind: str, dim: int, n_classes: int, seed: int) -> tuple[Any, list[dict[Any, Any]], str]:
    """(estimator, its parameter grid, the grid's parameter in words) for `kind`: logreg or mlp."""
    from pyspark.ml.classification import LogisticRegression, MultilayerPerceptronClassifier
    from pyspark.ml.tuning import ParamGridBuilder

    if kind == "logreg":
        lr = LogisticRegression(featuresCol="features", labelCol="y", family="multinomial", maxIter=200, tol=1e-6,
                                elasticNetParam=0.0)
        return lr, ParamGridBuilder().addGrid(lr.regParam, list(LOGREG_GRID)).build(), "regParam"
    mlp = MultilayerPerceptronClassifier(featuresCol="features", labelCol="y", maxIter=300, seed=seed, blockSize=128)
    grid = ParamGridBuilder().addGrid(mlp.layers, [[dim, h, n_classes] for h in MLP_GRID]).build()
    return mlp, grid, "layers"


def cross_validate(kind: str, train: Any, dim: int, n_classes: int, folds: int, seed: int) -> tuple[Any, dict]:
    """Fit `kind` with each grid point by `folds`-fold cross-validation on `train` (Training only), then refit
    the best on all of it. Returns (model, {"param": name, "tried": {value: mean accuracy}, "chosen": value})."""
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator

    est, grid, name = estimator(kind, dim, n_classes, seed)
    evaluator = MulticlassClassificationEvaluator(labelCol="y", predictionCol="prediction", metricName="accuracy")
    cv = CrossValidator(estimator=est, estimatorParamMaps=grid, evaluator=evaluator, numFolds=folds, seed=seed,
                        parallelism=1)
    model = cv.fit(train)
    values = [next(v for p, v in point.items() if p.name == name) for point in grid]
    scores = [float(s) for s in model.avgMetrics]
    best = values[int(np.argmax(scores))]
    tried = {str(v): round(s, 5) for v, s in zip(values, scores)}
    log.info("cross-validation (%d folds) of %s: %s, chosen %s", folds, name, tried, best)
    return model.bestModel, {"param": name, "tried": tried, "chosen": best}


def refit(kind: str, chosen: Any, train: Any, dim: int, n_classes: int, seed: int) -> Any:
    """The same classifier with the chosen parameter, on `train` whose features have `dim` components."""
    est, _, name = estimator(kind, dim, n_classes, seed)
    if kind == "logreg":
        return est.setRegParam(float(chosen)).fit(train)
    return est.setLayers([dim, int(chosen[1]), n_classes]).fit(train)


def predict(model: Any, frame: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(uris, true class indices, probabilities) of `frame`, collected in the frame's order."""
    rows = model.transform(frame).select("uri", "y", "probability").collect()
    uris = [r["uri"] for r in rows]
    y = np.asarray([int(r["y"]) for r in rows], dtype=np.int64)
    proba = np.asarray([r["probability"].toArray() for r in rows], dtype=np.float64).reshape(len(rows), -1)
    return uris, y, proba


def pca_table(kind: str, chosen: Any, train_emb: Any, test_emb: Any, dim: int, n_classes: int, seed: int,
              full_top1: float | None) -> list[dict[str, Any]]:
    """Top-1 on Test of the same classifier (the chosen parameter) on the full embeddings and on their PCA
    projections at k = 20, 50 and the fewest components reaching 95 % of the variance (PCA fitted on Training)."""
    from pyspark.ml.feature import PCA, VectorSlicer

    rows: list[dict[str, Any]] = []
    if full_top1 is None:
        _, y, proba = predict(refit(kind, chosen, train_emb, dim, n_classes, seed), test_emb)
        full_top1 = top_k(proba, y, 1)
    rows.append({"features": "embeddings", "k": dim, "top1": round(full_top1, 5)})
    pca = PCA(k=dim, inputCol="features", outputCol="pcs").fit(train_emb)
    explained = np.asarray(pca.explainedVariance.toArray())
    k95 = choose_k(explained, dim, PCA_TABLE_VARIANCE)
    for k, why in [*((k, f"PCA-{k}") for k in PCA_TABLE_K if k < dim), (k95, f"PCA variance {PCA_TABLE_VARIANCE}")]:
        slicer = VectorSlicer(inputCol="pcs", outputCol="features", indices=list(range(k)))

        def cut(frame: Any, slicer: Any = slicer) -> Any:
            return slicer.transform(pca.transform(frame).drop("features"))

        _, y, proba = predict(refit(kind, chosen, cut(train_emb), k, n_classes, seed), cut(test_emb))
        rows.append({"features": why, "k": k, "explained_variance": round(float(explained[:k].sum()), 4),
                     "top1": round(top_k(proba, y, 1), 5)})
    return rows
