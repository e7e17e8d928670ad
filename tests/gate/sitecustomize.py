"""Test-only fault gate, loaded by every Python process started with this folder on PYTHONPATH (Spark's workers
included): once FRUITPIPE_TEST_GATE_AFTER images have been prepared (counted across processes, in <gate>.count),
each further image waits while the file FRUITPIPE_TEST_GATE exists, and its process announces it by creating
<gate>.held-<pid>. A test can then act (kill
a worker, kill the driver) at a known point and let the run go on by deleting the gate: no sleep-timed races."""

import os

_GATE = os.environ.get("FRUITPIPE_TEST_GATE")
if _GATE:
    import time

    import fruitpipe.images as _images

    _after = int(os.environ.get("FRUITPIPE_TEST_GATE_AFTER", "0"))
    _original = _images.model_pixels  # what each embedded image goes through

    def _count() -> int:
        """One byte appended per image (O_APPEND writes are atomic): the file size counts every process's images."""
        fd = os.open(f"{_GATE}.count", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, b".")
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _gated(data, *args, **kwargs):
        if os.path.exists(_GATE) and _count() > _after:
            open(f"{_GATE}.held-{os.getpid()}", "w").close()
            while os.path.exists(_GATE):
                time.sleep(0.05)
        return _original(data, *args, **kwargs)

    _images.model_pixels = _gated

# FRUITPIPE_TEST_FAIL_WRITES=1: every Parquet write of a task fails as on a full disk (ENOSPC).
if os.environ.get("FRUITPIPE_TEST_FAIL_WRITES"):
    import errno

    import fruitpipe.storage as _storage

    def _full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    _storage.write_parquet = _full
