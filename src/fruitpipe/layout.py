"""The names of an output directory: what fruitpipe writes there, and the hidden name of a part not yet named by the
commit record."""

from __future__ import annotations

from fruitpipe.schemas import EMBEDDINGS_SCHEMA, REJECTS_SCHEMA

MARKER = "_fruitpipe.json"
SUCCESS = "_SUCCESS"
STAGING = "_staging"
RECORD = "_commit.json"
RUN_JSON = "run.json"
DATASETS = {"embeddings": EMBEDDINGS_SCHEMA, "rejects": REJECTS_SCHEMA}
REDUCE_DIRS = ("pca", "reduced")
#: Everything fruitpipe writes in an output: --overwrite deletes these names and nothing else.
#: Written beside the datasets: the classifier (`fruitpipe train`) and the run's visual report.
CLASSIFIER = "classifier"
REPORT = "report.html"
#: `fruitpipe drift`'s drift.json and drift.html, by default in the current output.
DRIFT = "drift"
#: `fruitpipe train --augment`'s variants of the Training photos (classify.augmented): rows for the classifier only.
AUGMENTED = "augmented"
OWN_ENTRIES = (MARKER, SUCCESS, STAGING, RECORD, RUN_JSON, "model", *DATASETS, *REDUCE_DIRS, CLASSIFIER, REPORT,
               DRIFT, AUGMENTED)
#: The writer's lease (fruitpipe.lease): never deleted by --overwrite, which runs under it.
LEASE_ENTRY = "_lease.json"


def hidden(uri: str) -> str:
    """The name a part has until the commit record names it: a leading "." hides it from folder readers."""
    head, _, name = uri.rpartition("/")
    return f"{head}/.pending-{name}"
