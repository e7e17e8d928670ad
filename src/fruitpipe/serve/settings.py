"""`fruitpipe serve`'s settings: where the classifier comes from, where the server listens, what an upload may be.
Apart from the app, so that the command line is built without FastAPI (the serve extra)."""

from __future__ import annotations

from dataclasses import dataclass

from fruitpipe import images
from fruitpipe.options import (
    classifier_output_option,
    in_range,
    max_pixels_option,
    option,
    positive_float,
    threads_option,
)
from fruitpipe.storage_options import StorageOptions

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Where the classifier comes from and what an upload may be."""

    output: str = classifier_output_option()
    storage: StorageOptions = StorageOptions()
    #: Where the server listens (serve/server.py): loopback unless the user opens it.
    host: str = option("127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for a LAN)")
    port: int = option(8000, type=in_range(0, 65535), help="port (default %(default)s)")
    #: Largest accepted upload, bytes (a phone photo is 2-6 MB).
    max_bytes: int = option(15 * MIB, type=in_range(1),
                            help="largest upload in bytes (default %(default)s); larger ones get 413")
    #: Largest decoded image, pixels (decompression-bomb guard, as --max-pixels in the batch pipeline).
    max_pixels: int = max_pixels_option()
    #: onnxruntime threads per request (0: onnxruntime's default).
    threads: int = threads_option()
    #: How a photo that is not square is fed (images.CROPS); `evaluate` measures each on labelled photos. Its flag
    #: is the one `evaluate` has too (cli_apps).
    crop: str = images.DEFAULT_CROP
    #: Photos decoded and inferred at once (0: one per core): the CPU they may take.
    decoders: int = option(0, type=in_range(0), help="photos decoded and identified at once (default: one per core)")
    #: Bytes all decodes at once may take, each admitted by its estimate from the header (images.decode_cost:
    #: pixels x peak bytes per pixel of its mode, measured by bench/decode_memory.py); a decode waits until its
    #: estimate fits. The default admits the costliest image under the default max_pixels (a 64 Mpx lossless WebP,
    #: 977 MiB measured, 1,029 MiB estimated); a phone JPEG takes about 6 MiB. An image whose estimate is over it
    #: is 422 too_large.
    decode_budget: int = option(
        1100 * MIB, flag="--decode-mb", unit=MIB, type=in_range(1),
        help="memory all decodes at once may take, MiB, each admitted by its estimate from the image's header "
             "(default %(default)s: the costliest image under the default --max-pixels; a phone JPEG takes about "
             "6); an image estimated over it gets 422")
    #: Uploads that may wait for a decoder; beyond, 503 with Retry-After (20 concurrent phone photos all get
    #: answers with the default).
    queue: int = option(32, type=in_range(0),
                        help="uploads that may wait for a decoder (default %(default)s); beyond, 503 with Retry-After")
    #: Seconds an upload may go without sending a byte before it gets 408 and its memory is freed.
    body_timeout: float = option(10.0, type=positive_float,
                                 help="seconds an upload may send nothing before it gets 408 (default %(default)g)")
    #: Seconds a whole upload may take, from its headers to its last byte; then 408 (a client dripping one byte
    #: every 4 s was served forever). 120 s carries the largest upload (15 MiB) at 1 Mbit/s, a 4 MB phone photo at
    #: 270 kbit/s.
    upload_timeout: float = option(120.0, type=positive_float,
                                   help="seconds a whole upload may take, headers to last byte, before 408 (default "
                                        "%(default)g: 15 MiB at 1 Mbit/s)")
    #: Seconds a request's headers may take (serve/server.py), then 408 and the connection closes.
    header_timeout: float = option(5.0, type=positive_float,
                                   help="seconds a request's headers may take to arrive before 408 and a closed "
                                        "connection (default %(default)g)")
    #: Open connections at once (serve/server.py); beyond, 503 and the new connection closes.
    max_connections: int = option(256, type=in_range(1),
                                  help="open connections and requests at once; beyond, 503 (default %(default)s)")
    #: Request bytes all requests together may hold in memory (upload bodies as they arrive, until answered, and
    #: the request line and headers of pipelined requests queued on a connection); beyond, an upload gets 503 with
    #: Retry-After and a connection's queue stops there: 100 uploads stalled at 14 MiB each held 1.4 GB without it.
    max_buffered: int = option(
        256 * MIB, flag="--max-buffered-mb", unit=MIB, type=in_range(1),
        help="request bytes held in memory by all requests together (upload bodies, queued pipelined requests), "
             "MiB (default %(default)s); beyond, 503")
    #: Serve /docs, /redoc and /openapi.json (off: they load Swagger UI from a CDN and describe the API to anyone).
    api_docs: bool = option(False, help="serve /docs, /redoc and /openapi.json (off by default: Swagger UI comes "
                                        "from a CDN)")
