"""How an output changes: part files published under hidden names then named by the commit record, committed rows
dropped, the PCA swapped and the classifier published, each through one record write (RunDir's other half)."""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import storage
from fruitpipe.layout import CLASSIFIER, DATASETS, RECORD, REDUCE_DIRS, hidden
from fruitpipe.storage import StorageOptions


class Commits:
    """The commit operations of RunDir (fruitpipe.output), which provides the record and the layout."""

    opts: StorageOptions
    guard: Callable[[], None] | None
    _record: dict[str, Any] | None

    def join(self, *parts: str) -> str:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _write_record(self, rec: dict[str, Any], token: str) -> None:
        raise NotImplementedError

    def commit_classifier(self, staged: dict[str, str], files: dict[str, str], token: str) -> None:
        """Publish a classifier staged under classifier/ as the parts are published: each staged file (name ->
        staged URI) moved to a hidden name, the record names the new files with their sha256 (`files`: name ->
        sha256) and the hidden ones as pending in one write (the lease checked first), then each is renamed over its
        name and the record drops the pending list. Killed before the record write: the old files, untouched, are
        still the classifier (a first train leaves none); after it: readers take the hidden files the record names
        (classifier_uri), so there is never a moment with nothing servable or an unrecorded file served."""
        if self.guard is not None:
            self.guard()
        storage.move_all([(src, hidden(self.join(CLASSIFIER, f"{token}-{name}"))) for name, src in staged.items()],
                         self.opts)
        self._record = None  # re-read: only this lease holder writes it, but the cache may predate the fit
        entry = {"token": token, "files": files, "pending": sorted(staged)}
        self._write_record({**self.record(), "classifier": entry}, token)
        for name in sorted(staged):
            storage.move(hidden(self.join(CLASSIFIER, f"{token}-{name}")), self.join(CLASSIFIER, name), self.opts)
        self._write_record({**self.record(), "classifier": {"token": token, "files": files}}, token)
        for uri, _ in list(storage.list_files(self.join(CLASSIFIER), self.opts)):
            if uri.rsplit("/", 1)[1].startswith(".pending-"):  # what an earlier train left hidden, named no more
                storage.delete(uri, self.opts)

    def classifier_uri(self, name: str) -> tuple[str, str | None]:
        """Where the record's classifier file `name` is (its own name, or the hidden one of a publish interrupted
        after its record write) and the sha256 the record names (None: no record of it, an older output)."""
        uri = self.join(CLASSIFIER, name)
        if not storage.exists(self.join(RECORD), self.opts):
            return uri, None
        entry = self.record().get("classifier") or {}
        if name in (entry.get("pending") or []):
            concealed = hidden(self.join(CLASSIFIER, f"{entry.get('token')}-{name}"))
            if storage.exists(concealed, self.opts):
                return concealed, (entry.get("files") or {}).get(name)
        return uri, (entry.get("files") or {}).get(name)

    def commit_parts(self, staging: str, token: str, settings: dict[str, Any] | None = None) -> int:
        """Publish the part files staged under `staging`/<dataset>/: moved under unique names, then named in the
        record in one write (which also drops the PCA, since the embeddings changed). Returns the files moved."""
        rec = self.record()
        added: dict[str, list[str]] = {}
        moves = []
        for name in DATASETS:
            src_dir = storage.join(staging, name)
            added[name] = []
            for src in storage.parquet_files(src_dir, self.opts):  # [] when nothing was staged
                dest = f"{token}-{src.rsplit('/', 1)[1]}"
                moves.append((src, self.join(name, dest)))
                added[name].append(dest)
        # Moved in under hidden names (Parquet readers, pandas and Spark skip names starting with "."), named in
        # the record (the lease checked first), then made visible: a writer that lost its lease at any instant
        # leaves at most hidden files, never rows a folder reader would count twice.
        storage.move_all([(src, hidden(dst)) for src, dst in moves], self.opts)
        n = sum(len(v) for v in added.values())
        if n or {**self.settings(), **(settings or {})} != self.settings():  # a no-op run leaves the record as is
            datasets = {name: rec["datasets"].get(name, []) + added.get(name, []) for name in DATASETS}
            changed = bool(added["embeddings"])
            pending = {name: files for name, files in added.items() if files}
            self._write_record({**rec, "datasets": datasets, "reduce": None if changed else rec.get("reduce"),
                                "settings": {**self.settings(), **(settings or {})}, "pending": pending}, token)
            self._make_visible(self.record(), token)
        return n

    def _make_visible(self, rec: dict[str, Any], token: str) -> None:
        """Rename the record's pending parts from their hidden names (those already renamed are skipped), then
        drop the pending list from the record."""
        pairs = []
        for name, files in (rec.get("pending") or {}).items():
            for f in files:
                concealed = hidden(self.join(name, f))
                if storage.exists(concealed, self.opts):
                    pairs.append((concealed, self.join(name, f)))
        storage.move_all(pairs, self.opts)
        self._write_record({k: v for k, v in rec.items() if k != "pending"}, token)

    def drop_rows(self, rows: dict[str, pa.Table], token: str) -> int:
        """Remove rows from committed parts: `rows[dataset]` has the _file and _row of each row to drop. Rewritten
        parts get new hidden names, one record write swaps them in, the old files are deleted, then the new ones made
        visible (a folder reader may miss rows for a moment, never count them twice). Returns rows."""
        rec = self.record()
        datasets = {name: list(rec["datasets"].get(name, [])) for name in DATASETS}
        replaced: list[str] = []
        pending: dict[str, list[str]] = {}
        dropped = 0
        emb_changed = False
        for name, table in rows.items():
            if table.num_rows == 0:
                continue
            by_file: dict[str, set[int]] = {}
            for f, r in zip(table.column("_file").to_pylist(), table.column("_row").to_pylist()):
                by_file.setdefault(f, set()).add(int(r))
            for fname, drop in sorted(by_file.items()):
                old = self.join(name, fname)
                t = storage.read_parquet(old, self.opts)
                mask = np.ones(t.num_rows, dtype=bool)
                mask[sorted(drop)] = False
                kept = t.filter(pa.array(mask))
                idx = datasets[name].index(fname)
                if kept.num_rows:
                    new = f"{token}-{uuid.uuid4().hex[:12]}.parquet"
                    storage.write_parquet(kept, hidden(self.join(name, new)), self.opts)  # visible once named
                    datasets[name][idx] = new
                    pending.setdefault(name, []).append(new)
                else:
                    datasets[name][idx] = ""
                replaced.append(old)
                dropped += t.num_rows - kept.num_rows
                emb_changed |= name == "embeddings"
        if not replaced:
            return 0
        datasets = {name: [f for f in files if f] for name, files in datasets.items()}
        self._write_record({**rec, "datasets": datasets, "reduce": None if emb_changed else rec.get("reduce"),
                            "pending": pending}, token)
        for old in replaced:  # before the new parts appear: a folder reader may miss rows, never count them twice
            storage.delete(old, self.opts)
        self._make_visible(self.record(), token)
        return dropped

    def commit_reduce(self, staging: str, fingerprint: dict[str, Any], token: str) -> None:
        """Replace pca/ and reduced/ by the staged ones: the record first forgets the old PCA, the directories are
        swapped, then the record names the new files. A crash at any point leaves a record that says 'no PCA',
        so the next run fits it again instead of trusting half-replaced directories."""
        rec = self.record()
        if rec.get("reduce") is not None:
            self._write_record({**rec, "reduce": None}, token)
        entry: dict[str, Any] = {"fingerprint": fingerprint}
        for name in REDUCE_DIRS:
            storage.delete(self.join(name), self.opts)
            src_dir = storage.join(staging, name)
            names = [posixpath.relpath(src, src_dir) for src, _ in storage.list_files(src_dir, self.opts)]
            storage.move_all([(storage.join(src_dir, rel), self.join(name, rel)) for rel in names], self.opts)
            entry[name] = sorted(names)
        self._write_record({**self.record(), "reduce": entry}, token)

    def ensure_datasets(self, token: str) -> None:
        """Readers always find both datasets with their schema: an empty part where a dataset has none."""
        rec = self.record()
        missing = [name for name in DATASETS if not rec["datasets"].get(name)]
        if not missing:
            return
        datasets = dict(rec["datasets"])
        for name in missing:
            part = f"{token}-part-empty.parquet"
            storage.write_parquet(DATASETS[name].empty_table(), self.join(name, part), self.opts)
            datasets[name] = [part]
        self._write_record({**rec, "datasets": datasets}, token)
