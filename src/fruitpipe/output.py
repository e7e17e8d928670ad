"""RunDir: the output directory as an object: claim, staging, the commit record, _SUCCESS, index reads (its commit
operations are in fruitpipe.commits, its names in fruitpipe.layout).

The commit record (`_commit.json`, replaced whole and atomically, as a table format's log) names every file that
belongs to the output. Part files are written under unique names and are only part of the output once the record
names them; a file the record does not name is debris of an interrupted run, removed by the next run that holds
the lease. A run decides what is done from the record alone, and `_SUCCESS` is written only when the record, the
directories and the accounting all agree.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import jsonio, storage
from fruitpipe.commits import Commits
from fruitpipe.errors import OutputError
from fruitpipe.layout import (  # noqa: F401  (re-exported: the output layout's names)
    CLASSIFIER,
    DATASETS,
    DRIFT,
    LEASE_ENTRY,
    MARKER,
    OWN_ENTRIES,
    RECORD,
    REDUCE_DIRS,
    REPORT,
    RUN_JSON,
    STAGING,
    SUCCESS,
    hidden,
)
from fruitpipe.schemas import conform
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


_AFRESH = "re-run `fruitpipe run` or `embed` with --overwrite to start this output afresh"


def _read_json(uri: str, opts: StorageOptions | None, what: str, fix: str = _AFRESH,
               etag_of: Any = None) -> dict[str, Any]:
    """A JSON object; with `etag_of` (a RunDir), an S3 object's ETag is kept there for its conditional rewrite."""
    try:
        if etag_of is not None and storage.is_s3(uri):
            raw, etag_of._record_etag = storage.read_with_etag(uri, opts)
        else:
            raw = storage.read_bytes(uri, opts)
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OutputError(f"{uri} is corrupt ({what}: {str(exc)[:80]}): {fix}") from None
    if not isinstance(doc, dict):
        raise OutputError(f"{uri} is corrupt ({what}: not a JSON object): {fix}")
    return doc


def corrupt_part(uri: str, exc: Exception) -> OutputError:
    """The error for a committed part file (OUT/<dataset>/<file>) that cannot be read."""
    record = storage.join(uri.rsplit("/", 2)[0], RECORD)
    return OutputError(f"{uri} is unreadable or corrupt ({str(exc)[:120]}): delete it and its name from {record}, "
                       "or re-run with --overwrite")


def index_columns(columns: list[str], schema: pa.Schema) -> pa.Schema:
    """The schema read_part_index gives: `columns` of a dataset's `schema`, then _file and _row."""
    return pa.schema([schema.field(c) for c in columns] + [("_file", pa.string()), ("_row", pa.int64())])


def read_part_index(uri: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    """The given columns of one committed part file (only those column chunks are read, never the features),
    conformed to the dataset's `schema`, plus _file (the part's name) and _row (the row in it); an unreadable part is
    corrupt_part's error. The executors' index_frame and the driver's drift sample (a part at a time) both use it."""
    try:
        t = storage.read_parquet_columns(uri, columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise corrupt_part(uri, exc) from None
    t = conform(t, pa.schema([schema.field(c) for c in columns]))
    return (t.append_column("_file", pa.repeat(pa.scalar(uri.rsplit("/", 1)[1], pa.string()), t.num_rows))
            .append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64))))


class RunDir(Commits):
    """One output directory (local path or s3:// prefix) and the protocol every stage uses to change it."""

    def __init__(self, uri: str, opts: StorageOptions | None = None) -> None:
        self.uri = storage.normalize(uri)
        #: How to reach it: the command's storage context (storage.configured) unless given.
        self.opts = opts or storage.current()
        self._record: dict[str, Any] | None = None
        #: Called before every write of the commit record (the lease's check): a run that lost its lease stops
        #: before it could publish anything over the run that took over.
        self.guard: Callable[[], None] | None = None
        #: Runs a write with the lease checked in the same transaction (lease.Lease.publish): a takeover cannot
        #: fall between the check and the record's write.
        self.under_lease: Callable[[Callable[[], None]], None] | None = None
        self._record_etag: str | None = None  # the S3 record's version this writer last read or wrote

    def join(self, *parts: str) -> str:
        """A URI inside the output."""
        return storage.join(self.uri, *parts)

    # -- ownership -----------------------------------------------------------------------------------------------

    def read_marker(self) -> dict[str, Any] | None:
        """The fingerprint of the configuration that owns this output, or None if it is not a fruitpipe output."""
        uri = self.join(MARKER)
        return _read_json(uri, self.opts, "the output's marker") if storage.exists(uri, self.opts) else None

    def marker_for_claim(self, overwrite: bool) -> dict[str, Any] | None:
        """The marker, where a corrupt one still proves the folder is fruitpipe's: --overwrite may replace it."""
        try:
            return self.read_marker()
        except OutputError:
            if not overwrite:
                raise
            return {"corrupt_marker": True}

    def check_separate_from(self, input_uri: str) -> None:
        """Refuse an OUTPUT equal to, inside, or holding INPUT: --overwrite would delete photos, and an output
        inside its input would be listed as input."""
        inp = storage.normalize(input_uri)
        out = self.uri
        if not storage.is_s3(inp) and not storage.is_s3(out):  # the same folders reached through links count too
            inp, out = os.path.realpath(inp), os.path.realpath(out)
        if _inside(out, inp) or _inside(inp, out):
            where = "the same as" if out == inp else "inside" if _inside(out, inp) else "a parent of"
            raise OutputError(f"OUTPUT {self.uri} is {where} INPUT {input_uri}: choose an OUTPUT outside the input "
                              "folder (and not containing it)")

    def check_claimable(self, fingerprint: dict[str, Any], overwrite: bool,
                        defaults: dict[str, Any]) -> dict[str, Any] | None:
        """Refuse a folder with files fruitpipe did not write, and an output made with another configuration
        (unless overwrite); returns the current marker. Read-only: run before the lease, and again by claim()."""
        previous = self.marker_for_claim(overwrite)
        if previous is None and self.has_foreign_files():
            raise OutputError(f"output {self.uri} exists and is not a fruitpipe output (no {MARKER}): choose an "
                              "empty or new OUTPUT; --overwrite never deletes files fruitpipe did not write")
        if previous is not None and previous != fingerprint and not overwrite:
            diff = ", ".join(
                f"{k} was {previous.get(k, defaults.get(k))!r} (now {fingerprint.get(k, defaults.get(k))!r})"
                for k in sorted(set(previous) | set(fingerprint)) if previous.get(k) != fingerprint.get(k))
            raise OutputError(f"output {self.uri} belongs to another configuration ({diff}): choose a new OUTPUT "
                              "or pass --overwrite")
        return previous

    def claim(self, fingerprint: dict[str, Any], overwrite: bool, defaults: dict[str, Any]) -> None:
        """Make the output ours (check_claimable, under the lease); --overwrite deletes only fruitpipe's own
        entries."""
        previous = self.check_claimable(fingerprint, overwrite, defaults)
        if previous is not None and previous != fingerprint:
            log.warning("--overwrite: deleting what fruitpipe wrote in %s (made with another configuration)",
                        self.uri)
            self.delete_own_entries()
        storage.write_bytes(self.join(MARKER), jsonio.dumps(fingerprint, indent=2).encode(), self.opts)

    def has_foreign_files(self) -> bool:
        """Whether the folder holds files and is not a fruitpipe output (no marker): never to be written over."""
        if storage.exists(self.join(MARKER), self.opts):
            return False
        return any(not u.endswith("/" + LEASE_ENTRY) for u, _ in storage.list_files(self.uri, self.opts))

    def delete_own_entries(self) -> None:
        """Delete what fruitpipe wrote (the names of its layout), never anything else in the folder."""
        for name in OWN_ENTRIES:
            storage.delete(self.join(name), self.opts)
        self._record = None

    # -- the commit record ---------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The commit record; an output from before records existed is adopted as it stands, without its PCA."""
        if self._record is None:
            uri = self.join(RECORD)
            if storage.exists(uri, self.opts):
                rec = _read_json(uri, self.opts, "the commit record", etag_of=self)
                if not isinstance(rec.get("datasets"), dict):
                    raise OutputError(f"{uri} is corrupt (no datasets): re-run with --overwrite")
            else:
                self._record_etag = None  # to be created: only if nobody else has meanwhile
                rec = {"format": 1, "version": 0, "reduce": None, "settings": {},
                       "datasets": {name: [u.rsplit("/", 1)[1] for u in storage.parquet_files(self.join(name),
                                                                                                self.opts)]
                                    for name in DATASETS}}
            self._record = rec
        return self._record

    def _write_record(self, rec: dict[str, Any], token: str) -> None:
        """Write the record, the lease checked first. Locally the check and the write share the lease's lock; on
        S3 the write is conditional on the record being the version this writer read, so a writer that stalled
        between its check and its write cannot overwrite the record of the run that took over."""
        rec = {**rec, "version": int(rec.get("version", 0)) + 1, "token": token,
               "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        body = jsonio.dumps(rec, indent=1).encode()
        uri = self.join(RECORD)

        def write() -> None:
            if not storage.is_s3(uri):
                storage.write_bytes(uri, body, self.opts)
                return
            etag = storage.put_if(uri, body, self._record_etag, self.opts)
            if etag is None:  # a retried PUT whose first answer was lost finds its own write: that is success
                current, current_etag = storage.read_with_etag(uri, self.opts)
                etag = current_etag if current == body else None
            if etag is None:
                raise OutputError(f"{uri} was changed by another run since this one read it (this run stalled and "
                                  "lost its lease): nothing more was published; re-run the command")
            self._record_etag = etag

        if self.under_lease is not None:
            self.under_lease(write)
        else:
            if self.guard is not None:
                self.guard()
            write()
        self._record = rec

    def classifier_sha256(self, name: str) -> str | None:
        """The sha256 the record names for a classifier file (None: no record of it, an older output)."""
        return self.classifier_uri(name)[1]

    def files(self, dataset: str) -> list[str]:
        """The committed part files of a dataset (URIs)."""
        return [self.join(dataset, name) for name in self.record()["datasets"].get(dataset, [])]

    def reduce_entry(self) -> dict[str, Any] | None:
        """The committed PCA (fingerprint, files of pca/ and reduced/), or None when there is none."""
        return self.record().get("reduce")

    def settings(self) -> dict[str, Any]:
        """Settings that decided the committed rows (e.g. max_pixels for too_large rejects)."""
        return dict(self.record().get("settings") or {})

    # -- reads ---------------------------------------------------------------------------------------------------

    def reduced_files(self) -> list[str]:
        """URIs of the committed reduced-vector part files ([] when the output has no PCA)."""
        return [self.join("reduced", f) for f in (self.reduce_entry() or {}).get("reduced", [])
                if f.endswith(".parquet")]

    def read_reduced(self, columns: list[str], max_rows: int | None = None, seed: int = 0) -> pa.Table | None:
        """The given columns of the committed reduced vectors (the files the record names), or None when the
        output has no PCA. With `max_rows`, a sample of at most that many rows, for a plot: whole parts in a seeded
        random order (a reduced part is an embeddings part, a round-robin share of its run's inputs: a spread of
        classes), the last one cut at random; only those parts are read, so the caller holds max_rows rows however
        large the output."""
        files = self.reduced_files()
        if not files:
            return None
        if max_rows is None:
            return pa.concat_tables([storage.read_parquet(f, self.opts, columns=columns) for f in files])
        if max_rows < 1:
            raise ValueError(f"max_rows must be 1 or more, not {max_rows}")
        rng = np.random.default_rng(seed)
        got: list[pa.Table] = []
        n = 0
        for i in rng.permutation(len(files)):
            if n >= max_rows:
                break
            part = storage.read_parquet(files[i], self.opts, columns=columns)
            if n + part.num_rows > max_rows:
                part = part.take(np.sort(rng.choice(part.num_rows, max_rows - n, replace=False)))
            got.append(part)
            n += part.num_rows
        return pa.concat_tables(got)

    # -- changes (the caller holds the lease) ---------------------------------------------------------------------

    def begin(self, token: str) -> None:
        """Start changing the output: readers lose _SUCCESS; debris of interrupted runs (files the record does not
        name, staging) is removed, so what the directories hold is what the record says."""
        storage.delete(self.join(SUCCESS), self.opts)
        storage.delete(self.join(STAGING), self.opts)
        rec = self.record()
        if rec.get("pending"):  # a commit named its parts and stopped before making them visible: finish it
            log.warning("finishing the commit of an interrupted run in %s (%d part(s) to make visible)", self.uri,
                        sum(len(v) for v in rec["pending"].values()))
            self._make_visible(rec, token)
            rec = self.record()
        removed = 0
        for name in DATASETS:
            keep = set(rec["datasets"].get(name, []))
            for uri, _ in list(storage.list_files(self.join(name), self.opts)):
                if uri.rsplit("/", 1)[1] not in keep:
                    storage.delete(uri, self.opts)
                    removed += 1
        entry = rec.get("reduce")
        for name in REDUCE_DIRS:
            keep = set(entry.get(name, [])) if entry else set()
            for uri, _ in list(storage.list_files(self.join(name), self.opts)):
                if posixpath.relpath(uri, self.join(name)) not in keep:
                    storage.delete(uri, self.opts)
                    removed += 1
        if removed:
            log.warning("removed %d file(s) of an interrupted run from %s (not in its commit record)", removed,
                        self.uri)
        if not storage.exists(self.join(RECORD), self.opts):
            self._write_record(rec, token)

    def staging(self, token: str, stage: str = "") -> str:
        """This run's private staging prefix; a stage's own one (`stage`) when its files must outlive the other's
        cleanup (the reduce stage stages while the embed stage's accounting, which deletes its prefix, runs)."""
        return self.join(STAGING, f"{token}.{stage}" if stage else token)

    # -- publishing ----------------------------------------------------------------------------------------------

    def consistency_problems(self) -> list[str]:
        """Differences between the record and the directories (empty when they agree)."""
        rec = self.record()
        problems = []
        for name in DATASETS:
            on_disk = {u.rsplit("/", 1)[1] for u, _ in storage.list_files(self.join(name), self.opts)}
            named = set(rec["datasets"].get(name, []))
            if on_disk != named:
                problems.append(f"{name}/: {len(named - on_disk)} named file(s) missing, "
                                f"{len(on_disk - named)} unnamed file(s)")
        entry = rec.get("reduce")
        for name in REDUCE_DIRS:
            on_disk = {posixpath.relpath(u, self.join(name)) for u, _ in storage.list_files(self.join(name), self.opts)}
            named = set(entry.get(name, [])) if entry else set()
            if on_disk != named:
                problems.append(f"{name}/ does not match the commit record")
        return problems

    def publish(self, report: dict[str, Any], complete: bool, why_not: str = "") -> None:
        """Write run.json; write _SUCCESS only when `complete` and the directories match the record."""
        storage.delete(self.join(STAGING), self.opts)
        storage.write_bytes(self.join(RUN_JSON), jsonio.dumps(report, indent=2).encode(), self.opts)
        if not complete:
            raise OutputError(f"{why_not}; {self.uri}/_SUCCESS was not written: re-run the same command to repair")
        problems = self.consistency_problems()
        if problems:
            raise OutputError(f"the output does not match its commit record ({'; '.join(problems)}); "
                              f"{self.uri}/_SUCCESS was not written: re-run the same command to repair")
        storage.write_bytes(self.join(SUCCESS), b"", self.opts)

    def previous_report(self) -> dict[str, Any]:
        """The last run.json, or {} when there is none."""
        uri = self.join(RUN_JSON)
        fix = "re-run `fruitpipe embed INPUT OUTPUT` (nothing is re-embedded) to write it again"
        return _read_json(uri, self.opts, "the last run's report", fix) if storage.exists(uri, self.opts) else {}
