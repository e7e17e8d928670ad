"""Test-only fault gate, loaded by every Python process started with this folder on PYTHONPATH (Spark's workers
included): once a process has prepared FRUITPIPE_TEST_GATE_AFTER images, each further image waits while the file
FRUITPIPE_TEST_GATE exists, and the process announces it by creating <gate>.held-<pid>. A test can then act (kill
a worker, kill the driver) at a known point and let the run go on by deleting the gate: no sleep-timed races."""

import os

_GATE = os.environ.get("FRUITPIPE_TEST_GATE")
if _GATE:
    import time

    import fruitpipe.images as _images

    _after = int(os.environ.get("FRUITPIPE_TEST_GATE_AFTER", "0"))
    _seen = [0]
    _original = _images.model_input

    def _gated(data, size, max_pixels):
        _seen[0] += 1
        if _seen[0] > _after and os.path.exists(_GATE):
            open(f"{_GATE}.held-{os.getpid()}", "w").close()
            while os.path.exists(_GATE):
                time.sleep(0.05)
        return _original(data, size, max_pixels)

    _images.model_input = _gated
