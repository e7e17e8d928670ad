"""The "before" picture: Spark as commonly written, binaryFile + a pandas UDF that loads the model per batch.

Run by bench/run.py in its own process: python bench/naive_spark.py IMAGES_DIR OUT_DIR MODEL_FILE
Prints one JSON line: {"images": N, "seconds": S} (from after Spark start to the written Parquet).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
import pandas as pd


def main() -> None:
    images_dir, out_dir, model_file = sys.argv[1:4]
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import col, pandas_udf
    from pyspark.sql.types import ArrayType, FloatType

    spark = (SparkSession.builder.master("local[*]").appName("naive")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    t0 = time.perf_counter()

    @pandas_udf(ArrayType(FloatType()))
    def embed(content: pd.Series) -> pd.Series:
        import onnxruntime as ort
        from PIL import Image

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # one thread per task, as usually written
        session = ort.InferenceSession(model_file, sess_options=opts)  # loaded on every batch
        batch = np.stack([
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
            / 127.5 - 1.0
            for b in content
        ])
        feats = session.run(["features"], {"input": batch})[0]
        return pd.Series(list(feats))

    df = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(images_dir)
          .select(col("path"), embed(col("content")).alias("features")))
    df.write.mode("overwrite").parquet(out_dir)
    n = spark.read.parquet(out_dir).count()
    print(json.dumps({"images": n, "seconds": time.perf_counter() - t0}))
    spark.stop()


if __name__ == "__main__":
    main()
