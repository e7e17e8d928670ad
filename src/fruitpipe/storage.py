"""URIs (local paths, file://, s3://) to pyarrow filesystems: list, read, write whole objects, publish."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fruitpipe import s3_objects

# The names every caller imports from here: the options, and the context that carries them to every call.
from fruitpipe.storage_options import StorageOptions as StorageOptions
from fruitpipe.storage_options import carried as carried
from fruitpipe.storage_options import configure as configure
from fruitpipe.storage_options import configured as configured
from fruitpipe.storage_options import current as current

_FS_CACHE: dict[tuple[str, str | None, str], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Canonical form: s3://bucket/key without trailing slash, or an absolute local path."""
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for `uri`; one filesystem object per process and endpoint."""
    uri = normalize(uri)
    if is_s3(uri):
        opts = opts or current()
        key = ("s3", opts.s3_endpoint, opts.region)
        with _FS_LOCK:
            fs = _FS_CACHE.get(key)
            if fs is None:
                # Credentials come from the standard AWS chain (env, profile, instance role); none in code.
                fs = pafs.S3FileSystem(
                    region=opts.region,
                    endpoint_override=opts.s3_endpoint,
                    scheme="http" if (opts.s3_endpoint or "").startswith("http://") else "https",
                )
                _FS_CACHE[key] = fs
        return fs, uri[len("s3://") :]
    with _FS_LOCK:
        fs = _FS_CACHE.setdefault(("local", None, ""), pafs.LocalFileSystem())
    return fs, uri


def join(uri: str, *parts: str) -> str:
    """Append path segments to a URI."""
    base = uri.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def to_uri(uri_root: str, fs_path: str) -> str:
    """Turn a path returned by a filesystem of `uri_root` back into a URI of the same kind."""
    return "s3://" + fs_path if is_s3(uri_root) else fs_path


def exists(uri: str, opts: StorageOptions | None = None) -> bool:
    """Whether a file or directory exists at `uri`."""
    fs, path = resolve(uri, opts)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, opts: StorageOptions | None = None) -> bool:
    """Whether `uri` is a directory (or a non-empty prefix on S3)."""
    fs, path = resolve(uri, opts)
    return fs.get_file_info(path).type == pafs.FileType.Directory


#: S3 listing threads (--list-threads). 1 = one flat, paginated listing: on a loopback S3 server it listed 5,000
#: objects in 1.2 s against 2.6 s fanned out in 16 threads, and 20,000 in 4.2 s against 7.1 s; with 100 ms added
#: per request the two were even (7.2 and 7.0 s; docs/performance.md). Fanning out can only pay where round trips
#: dominate, e.g. 10^7 objects (10,000 sequential pages) on S3: not measured.
LIST_THREADS = 1
#: When fanning out: levels listed one at a time (split, class) before each prefix is listed in a thread.
LIST_FAN_OUT_DEPTH = 2


def _s3_infos(fs: pafs.FileSystem, path: str, threads: int) -> Iterator[pafs.FileInfo]:
    """Every file object below `path` on S3: one flat paginated listing, or fanned out by prefix in threads."""
    if threads <= 1:
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            if info.type == pafs.FileType.File:
                yield info
        return
    def one_level(prefix: str) -> list[pafs.FileInfo]:
        return fs.get_file_info(pafs.FileSelector(prefix, recursive=False, allow_not_found=True))

    def whole(prefix: str) -> list[pafs.FileInfo]:
        return fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fruitpipe-list") as pool:
        prefixes = [path]
        for _ in range(LIST_FAN_OUT_DEPTH):
            below: list[str] = []
            for infos in pool.map(one_level, prefixes):
                for info in infos:
                    if info.type == pafs.FileType.File:
                        yield info
                    elif info.type == pafs.FileType.Directory:
                        below.append(info.path)
            prefixes = below
        for infos in pool.map(whole, prefixes):
            yield from (info for info in infos if info.type == pafs.FileType.File)


def list_files(uri: str, opts: StorageOptions | None = None, threads: int | None = None) -> Iterator[tuple[str, int]]:
    """Every file below `uri`, recursively, as (URI, size in bytes): fruitpipe's own outputs (no links followed).

    S3 with one thread (the default, LIST_THREADS) is listed in one recursive pass, which pyarrow paginates. With
    more threads an S3 listing fans out: the top LIST_FAN_OUT_DEPTH levels are listed one level at a time, then
    the prefixes found are listed recursively, `threads` at once. Inputs are listed with walk_input instead.
    """
    threads = LIST_THREADS if threads is None else threads
    fs, path = resolve(uri, opts)
    root = normalize(uri)
    if is_s3(uri):
        for info in _s3_infos(fs, path, threads):
            yield to_uri(root, info.path), int(info.size or 0)
        return
    for entry in walk_input(root, follow_links=False)[0]:
        yield entry.uri, entry.size


@dataclass(frozen=True)
class Entry:
    """One input file as listed: URI, size, modification time (ns); `problem` is set when it cannot be used as is
    (a name that is not UTF-8), with the name escaped into `uri`."""

    uri: str
    size: int
    mtime_ns: int
    problem: str | None = None


#: Why a listed path is not an input (counted in run.json under "ignored").
IGNORED_REASONS = {
    "symlink_repeat": "a link to a folder already listed (a loop, or a second way into the same folder)",
    "dangling_symlink": "a link whose target does not exist",
    "not_a_regular_file": "a FIFO, socket or device",
    "unreadable_folder": "a folder that could not be listed (permission denied)",
}


def _escaped(path: str) -> str:
    """A path whose undecodable bytes (surrogate escapes) are written as \\xNN, so it can be stored and shown."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk_input(uri: str, opts: StorageOptions | None = None, threads: int | None = None,
               follow_links: bool = True) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Every file below an input `uri`: (entries, ignored [(path, reason)]).

    Locally, the real folders are walked first and linked folders after, each real folder (device, inode) at
    most once: a link loop ends, and a photo reached both directly and through a link keeps its own class
    folder. Dangling links, FIFOs, sockets and devices are ignored with their reason. A name that is not UTF-8 is
    listed with a problem (it becomes a reject), never stops the listing.
    """
    if is_s3(uri):
        fs, path = resolve(uri, opts)
        root = normalize(uri)
        infos = _s3_infos(fs, path, LIST_THREADS if threads is None else threads)
        return [Entry(to_uri(root, i.path), int(i.size or 0), int(i.mtime_ns or 0)) for i in infos], []
    root = normalize(uri)
    entries: list[Entry] = []
    ignored: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    linked: list[str] = []  # linked folders, walked after every real one

    def walk(folder: str) -> None:
        try:
            st = os.stat(folder)
        except OSError:
            ignored.append((_escaped(folder), "unreadable_folder"))
            return
        if (st.st_dev, st.st_ino) in seen:
            ignored.append((_escaped(folder), "symlink_repeat"))
            return
        seen.add((st.st_dev, st.st_ino))
        stack = [folder]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError:
                ignored.append((_escaped(current), "unreadable_folder"))
                continue
            subdirs = []
            for item in items:
                try:
                    if item.is_symlink():
                        if not follow_links:
                            continue
                        try:
                            target = os.stat(item.path)
                        except OSError:
                            ignored.append((_escaped(item.path), "dangling_symlink"))
                            continue
                        if stat.S_ISDIR(target.st_mode):
                            linked.append(item.path)
                            continue
                        if not stat.S_ISREG(target.st_mode):
                            ignored.append((_escaped(item.path), "not_a_regular_file"))
                            continue
                        info = target
                    elif item.is_dir(follow_symlinks=False):
                        dst = item.stat(follow_symlinks=False)
                        if (dst.st_dev, dst.st_ino) not in seen:
                            seen.add((dst.st_dev, dst.st_ino))
                            subdirs.append(item.path)
                        continue
                    elif item.is_file(follow_symlinks=False):
                        info = item.stat(follow_symlinks=False)
                    else:
                        ignored.append((_escaped(item.path), "not_a_regular_file"))
                        continue
                except OSError:
                    ignored.append((_escaped(item.path), "unreadable_folder"))
                    continue
                try:
                    item.path.encode("utf-8")
                    entries.append(Entry(item.path, int(info.st_size), int(info.st_mtime_ns)))
                except UnicodeEncodeError:
                    entries.append(Entry(_escaped(item.path), int(info.st_size), int(info.st_mtime_ns),
                                         "bad_name"))
            stack.extend(reversed(subdirs))

    if os.path.isdir(root):
        walk(root)
        while linked:
            walk(linked.pop(0))
    return entries, ignored


def read_bytes(uri: str, opts: StorageOptions | None = None) -> bytes:
    """The whole object at `uri`."""
    fs, path = resolve(uri, opts)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_object(uri: str, opts: StorageOptions | None = None) -> bytes:
    """The whole object at `uri` in as few requests as possible: on S3 one GET (pyarrow's reader sends a HEAD
    first, for the size, then ranged GETs), locally one read. A missing object raises FileNotFoundError, a refused
    one PermissionError; other failures propagate as OSError so that the caller's task is retried."""
    if not is_s3(uri):
        return read_bytes(uri, opts)
    return s3_objects.get(normalize(uri), opts)[0]


def read_with_etag(uri: str, opts: StorageOptions | None = None) -> tuple[bytes, str]:
    """An S3 object's bytes and ETag, in one GET (what a later put_if compares against)."""
    return s3_objects.get(normalize(uri), opts)


def put_if(uri: str, data: bytes, etag: str | None, opts: StorageOptions | None = None) -> str | None:
    """Write an S3 object only if it is still the version `etag` names (None: only if it does not exist), with
    S3's conditional writes; returns the new ETag, or None when another writer changed it first."""
    return s3_objects.put_if(normalize(uri), data, etag, opts)


def _tmp_sibling(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def write_bytes(uri: str, data: bytes, opts: StorageOptions | None = None) -> None:
    """Write an object whole: on S3 a PUT is atomic; locally write a sibling then rename over."""
    fs, path = resolve(uri, opts)
    if is_s3(uri):
        with fs.open_output_stream(path) as fh:
            fh.write(data)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = _tmp_sibling(path)
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, path)
    except BaseException:  # a full disk, an interrupt: no temporary sibling is left behind
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def write_parquet(table: pa.Table, uri: str, opts: StorageOptions | None = None) -> None:
    """Write a Parquet file whole (never half-visible), zstd-compressed."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), opts)


def read_parquet(uri: str, opts: StorageOptions | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file into a table."""
    fs, path = resolve(uri, opts)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_parquet_columns(uri: str, columns: list[str], opts: StorageOptions | None = None) -> pa.Table:
    """The given columns of one Parquet file, those it lacks left out (older files); only their column chunks are
    read, never e.g. the features of an embeddings file."""
    fs, path = resolve(uri, opts)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=present)


def parquet_files(uri: str, opts: StorageOptions | None = None) -> list[str]:
    """Committed part files of a dataset directory, sorted (temporary siblings are skipped)."""
    return sorted(u for u, _ in list_files(uri, opts) if u.endswith(".parquet"))


def delete(uri: str, opts: StorageOptions | None = None) -> None:
    """Remove a file or a whole directory if it exists."""
    fs, path = resolve(uri, opts)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def move(src: str, dst: str, opts: StorageOptions | None = None) -> None:
    """Rename a file (local: atomic rename; S3: copy then delete, each object appearing whole)."""
    fs, src_path = resolve(src, opts)
    _, dst_path = resolve(dst, opts)
    if not is_s3(dst):
        # S3 has no folders; creating one would also ask for the bucket (HeadBucket = s3:ListBucket on the
        # whole bucket), which a prefix-scoped IAM policy rightly does not grant.
        fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
    fs.move(src_path, dst_path)


#: Moves at once on S3, where each is a copy and a delete (two round trips): the 20,000 parts of a ten-million-image
#: run moved one after the other would hold a commit for tens of minutes.
MOVE_THREADS = 16


def move_all(pairs: list[tuple[str, str]], opts: StorageOptions | None = None) -> None:
    """move() each (src, dst): on S3 MOVE_THREADS at a time, locally one after the other (a rename is instant).
    Callers name the files in the commit record only once every move is done, so their order does not matter."""
    if len(pairs) > 1 and any(is_s3(dst) for _, dst in pairs):
        with ThreadPoolExecutor(MOVE_THREADS) as pool:
            for _ in pool.map(lambda pair: move(pair[0], pair[1], opts), pairs):
                pass
        return
    for src, dst in pairs:
        move(src, dst, opts)
