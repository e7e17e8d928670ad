"""Run configuration: one frozen dataclass, merged from TOML < environment < flags, validated once."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fruitpipe.errors import ConfigError
from fruitpipe.images import DEFAULT_MAX_PIXELS, LAYOUTS, PREPROCESS
from fruitpipe.models.registry import CUSTOM, get_spec
from fruitpipe.options import option, share, whole_number
from fruitpipe.storage_options import DEFAULT_REGION

#: Prefix of the environment variables that override config fields (FRUITPIPE_K=30, FRUITPIPE_MASTER=...).
ENV_PREFIX = "FRUITPIPE_"
#: The tables [fruitpipe.<name>] of the other commands' settings in the same TOML file (cli_layers.py): `run` skips
#: them, and FRUITPIPE_<NAME>_* variables are theirs.
COMMAND_TABLES = ("train", "evaluate", "serve", "drift", "sample", "emr")


@dataclass(frozen=True)
class Config:
    """Everything one run needs; paths are URIs (a local path, file://, or s3://bucket/prefix). The fields declared
    with option() are `run`'s, `embed`'s (section embed) and `reduce`'s (section reduce) flags (run_args.py)."""

    input: str
    output: str
    #: INPUT is a list of images (Parquet or CSV with a uri column, or a folder of them: S3 Inventory), not a folder.
    input_list: bool = False
    model: str = option("mobilenet_v2", section="embed",
                        help="backbone from the registry (default %(default)s; see `fruitpipe models`)")
    #: An ONNX file (local, or s3:// read once by the driver) used instead of the registry's download; its
    #: sha256 is recorded and compared with the registry's (a mismatch is logged: custom weights).
    model_path: str | None = option(None, section="embed", metavar="FILE",
                                    help="ONNX file to use instead of downloading: a local path or s3:// URI (read "
                                         "once, broadcast)")
    #: Any ONNX image model (--model-path with these): its input size, pixel scaling (tf, torch, raw), layout (nhwc,
    #: nchw) and embedding output; unset ones are read from the file where it says them (models/custom.py).
    input_size: int | None = option(None, section="embed", type=whole_number, metavar="N",
                                    help="with --model-path: the model's square input size (default: the file's, "
                                         "else 224)")
    preprocess: str | None = option(None, section="embed", choices=PREPROCESS,
                                    help="with --model-path: pixel scaling, tf = pixel/127.5-1 (default), torch = "
                                         "ImageNet mean/std, raw = 0..255")
    layout: str | None = option(None, section="embed", choices=LAYOUTS,
                                help="with --model-path: input layout (default: from the file's input shape, else "
                                     "nhwc)")
    output_name: str | None = option(None, section="embed", flag="--output", key="output_name", metavar="NAME",
                                     help="with --model-path: the output tensor holding the embedding (default: the "
                                          "only output)")
    #: Number of PCA components; ignored when `variance` is set.
    k: int = option(20, section="reduce", exclusive="pca", help="number of PCA components (default %(default)s)")
    #: Keep the fewest components whose cumulative explained variance reaches this share (0 < v <= 1).
    variance: float | None = option(None, section="reduce", exclusive="pca", type=share,
                                    help="keep the fewest components reaching this explained-variance share, e.g. "
                                         "0.95")
    #: Project with the PCA of this other OUTPUT (same model) instead of fitting one: a stable reduced space across
    #: runs, so a classifier trained on last month's vectors reads this month's; k comes from that basis.
    pca_from: str | None = option(None, section="reduce", metavar="OTHER_OUTPUT",
                                  help="project with the PCA already fitted in OTHER_OUTPUT (same model) instead of "
                                       "refitting: a stable basis across runs; k is that basis's")
    master: str = option("local[*]", section="common",
                         help="Spark master URL (default %(default)s; spark://host:7077, yarn)")
    #: onnxruntime threads per task = spark.task.cpus; one task per core with 1 thread each measured 162 img/s
    #: against 145 for one task with 2 threads (decoding then runs on one core only; docs/performance.md).
    task_cpus: int = option(1, section="embed", help="onnxruntime threads per Spark task (default %(default)s)")
    #: Inference device: "auto" uses CUDA where onnxruntime-gpu and a GPU are present, else the CPU (logged);
    #: "cuda" asks for it (falls back to the CPU with a warning); "cpu" never uses a GPU.
    device: str = option("auto", section="embed", choices=("auto", "cpu", "cuda"),
                         help="inference device (default %(default)s: CUDA if onnxruntime-gpu sees a GPU, else CPU)")
    #: "fp32", or "int8": a static-quantized copy (QDQ, per channel) calibrated on 200 Training images of the
    #: input, kept in OUTPUT/model/. Measured on the sample: model 2.25x faster, embed stage 1.69x (286 against 170
    #: img/s), Test accuracy of a linear probe 98.48 % against 98.71 % (bench/int8.py): opt-in, as it costs accuracy.
    precision: str = option("fp32", section="embed", choices=("fp32", "int8"),
                            help="fp32 or int8 (default %(default)s): int8 embeds 1.7x faster, slightly less "
                                 "accurate")
    #: Images per onnxruntime call: the raw onnxruntime sweep peaked at 32 (16: 195, 32: 204, 64: 195 img/s).
    batch_size: int = option(32, section="embed", help="images per onnxruntime call (default %(default)s)")
    #: Images per Spark task. Measured on the 5,280-image sample, local[2] (docs/performance.md): 256 -> 162 img/s,
    #: 512 -> 180, 1024 -> 178, 2048 -> 156 (too few tasks to balance); 512 keeps retries cheap and progress smooth.
    partition_size: int = option(512, section="embed", help="images per Spark task (default %(default)s)")
    #: Inputs read concurrently by each task on S3, to hide its latency (20-50 ms per small object); local
    #: inputs are read one at a time (the sweep showed no gain from a pool there).
    read_ahead: int = option(8, section="embed", help="inputs read concurrently per task (default %(default)s)")
    #: Threads listing an s3:// INPUT: 1 lists flat (fastest measured up to 20,000 objects on a loopback server);
    #: more fans the listing out by split and class prefix, for millions of objects on S3 (storage.LIST_THREADS).
    list_threads: int = option(1, section="embed",
                               help="threads listing an s3:// INPUT (default %(default)s: flat; e.g. 16 for millions "
                                    "of objects)")
    #: Images whose header claims more pixels than this are rejected before decoding (decompression bombs).
    max_pixels: int = option(DEFAULT_MAX_PIXELS, section="embed",
                             help="reject images larger than this (default %(default)s)")
    #: S3 endpoint (a loopback server in tests); None = the AWS default for the region.
    s3_endpoint: str | None = None
    #: AWS region for s3:// URIs; EU by default (GDPR).
    region: str = DEFAULT_REGION
    #: Replace an output made with another input or model instead of refusing it.
    overwrite: bool = option(False, section="embed", help="replace an OUTPUT made with another input or model")
    quiet: bool = False
    #: Extra Spark settings (key -> value), e.g. {"spark.executor.memory": "4g"}.
    spark_conf: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> Config:
        """Check every field; raise ConfigError with a message that says how to fix the value."""
        if not self.input:
            raise ConfigError("INPUT is empty: pass a folder or an s3://bucket/prefix holding Class/ folders")
        if not self.output:
            raise ConfigError("OUTPUT is empty: pass a folder or an s3://bucket/prefix for the results")
        if self.is_custom:
            if self.preprocess is not None and self.preprocess not in PREPROCESS:
                raise ConfigError(f"--preprocess {self.preprocess!r} is not one of {', '.join(PREPROCESS)}")
            if self.layout is not None and self.layout not in LAYOUTS:
                raise ConfigError(f"--layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
            if self.input_size is not None and not 8 <= self.input_size <= 4096:
                raise ConfigError(f"--input-size {self.input_size} must be between 8 and 4096 pixels, e.g. 224")
        else:
            get_spec(self.model)
        if self.variance is not None:
            if not 0.0 < self.variance <= 1.0:
                raise ConfigError(
                    f"--variance {self.variance} is outside (0, 1]: give a share such as 0.95 for 95 %"
                )
        elif self.k < 1:
            raise ConfigError(f"--k {self.k} must be at least 1: use e.g. --k 20, or --variance 0.95")
        elif not self.is_custom and self.k > get_spec(self.model).dim:  # a custom model's size is known on load
            raise ConfigError(
                f"--k {self.k} exceeds the embedding size {get_spec(self.model).dim} of {self.model}: use a smaller --k"
            )
        if self.precision not in ("fp32", "int8"):
            raise ConfigError(f"--precision {self.precision!r} is not one of fp32, int8")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        for name, low in (("task_cpus", 1), ("batch_size", 1), ("partition_size", 1), ("max_pixels", 1),
                          ("read_ahead", 1), ("list_threads", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        _check_master(self.master)
        for key, value in self.spark_conf.items():
            if (key.endswith(".memory") or key.endswith("memoryOverhead") or key.endswith("maxResultSize")) \
                    and not _MEMORY.fullmatch(str(value).strip().lower()):
                raise ConfigError(f"--spark-conf {key}={value!r} is not a size: use e.g. {key}=4g (k, m, g or t)")
        if self.model_path is not None and not self.model_path.startswith("s3://") \
                and not os.path.isfile(self.model_path):
            raise ConfigError(f"--model-path {self.model_path} is not a file: point it at a .onnx file or s3:// URI")
        return self

    @property
    def is_custom(self) -> bool:
        """True for a model given by file and flags rather than by a registered name."""
        return self.model == CUSTOM or any(v is not None for v in (self.input_size, self.preprocess, self.layout,
                                                                    self.output_name))

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view, for run.json."""
        d = dataclasses.asdict(self)
        d["spark_conf"] = dict(self.spark_conf)
        return d


_MEMORY = re.compile(r"\d+[kmgtp]?b?")
_MASTER = re.compile(r"local(\[(\*|[1-9]\d*)(,\s*[0-9]+)?\])?|local-cluster\[[1-9]\d*,\s*[1-9]\d*,\s*[1-9]\d*\]"
                     r"|spark://[^\s/]+:\d+(,[^\s/]+:\d+)*|yarn|k8s://\S+")


def _check_master(master: str) -> None:
    """Refuse a master URL Spark would fail on with a Java trace (garbage, local[0])."""
    if not _MASTER.fullmatch(master):
        raise ConfigError(f"--master {master!r} is not a Spark master URL: use local[*], local[N] (N >= 1), "
                          "spark://HOST:PORT, yarn or k8s://...")


#: Settings of which only one may be in force: a layer (TOML, environment, flags) that sets one clears the other
#: from the layers below it.
EXCLUSIVE = (("k", "variance"),)


def _coerce(name: str, raw: Any, source: str) -> Any:
    """Convert a TOML/env value to the type of field `name`; a wrong type is a ConfigError naming its source."""
    types = {f.name: f.type for f in fields(Config)}
    kind = str(types[name])
    from_text = isinstance(raw, str) and source.startswith("environment")

    def bad(what: str) -> ConfigError:
        return ConfigError(f"setting {name} = {raw!r} ({source}) must be {what}: fix the value")

    if raw is None:
        return None
    if kind.startswith("int"):
        if isinstance(raw, bool) or not isinstance(raw, (int, str)) or (isinstance(raw, str) and not from_text):
            raise bad("a whole number, e.g. 20")
        try:
            return int(raw)
        except ValueError:
            raise bad("a whole number, e.g. 20") from None
    if kind.startswith("float"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)) or (isinstance(raw, str) and not from_text):
            raise bad("a number, e.g. 0.95")
        try:
            return float(raw)
        except ValueError:
            raise bad("a number, e.g. 0.95") from None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower() if from_text else None
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise bad("true or false")
    if kind.startswith("Mapping"):
        if isinstance(raw, Mapping) and all(isinstance(v, (str, int, float, bool)) for v in raw.values()):
            return {str(k): str(v) for k, v in raw.items()}
        raise bad("a table of key = value, e.g. [fruitpipe.spark_conf]")
    if not isinstance(raw, str):
        raise bad("a string (in quotes)")
    return raw


def _layer(merged: dict[str, Any], values: Mapping[str, Any]) -> None:
    """Apply one layer over the ones below: its values win, and setting one of an exclusive pair clears the other."""
    for a, b in EXCLUSIVE:
        for mine, other in ((a, b), (b, a)):
            if values.get(mine) is not None and values.get(other) is None:
                merged.pop(other, None)
    merged.update({k: v for k, v in values.items() if v is not None})


def read_toml(path: str) -> dict[str, Any]:
    """A --config file's contents, or one line saying what is wrong with it (every command's --config)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist: give the path of a TOML file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path} is a folder: give the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path} cannot be read ({exc.strerror}): check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} is not valid TOML ({exc}): fix the file") from None


def load_config(
    flags: Mapping[str, Any],
    toml_path: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge a TOML file (table [fruitpipe] or top level), FRUITPIPE_* variables and flags: flags win over the
    environment, which wins over the file; each layer that sets k or variance clears the other one below it."""
    env = os.environ if env is None else env
    known = {f.name for f in fields(Config)}
    merged: dict[str, Any] = {}
    if toml_path:
        data: Any = read_toml(toml_path)
        data = data.get("fruitpipe", data)
        if not isinstance(data, dict):
            raise ConfigError(f"--config {toml_path}: [fruitpipe] must be a table of settings, not {data!r}")
        data = {k: v for k, v in data.items() if not (k in COMMAND_TABLES and isinstance(v, dict))}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {toml_path}; "
                              f"known: {', '.join(sorted(known))}")
        _layer(merged, {k: _coerce(k, v, f"in {toml_path}") for k, v in data.items()})
    from_env = {}
    for name in known:
        key = ENV_PREFIX + name.upper()
        if key in env and name not in {"input", "output", "spark_conf"}:
            from_env[name] = _coerce(name, env[key], f"environment {key}")
    _layer(merged, from_env)
    _layer(merged, {k: v for k, v in flags.items() if v is not None and k in known})
    if "input" not in merged or "output" not in merged:
        raise ConfigError("both INPUT and OUTPUT are required: fruitpipe run INPUT OUTPUT")
    return Config(**merged)


def task_count(n: int, partition_size: int, slots: int) -> int:
    """Tasks of the embed job for `n` inputs: whole waves, at least one task per slot and a multiple of the slots so
    no core idles at the end, never more tasks than inputs."""
    return min(max(1, math.ceil(math.ceil(n / partition_size) / slots) * slots), n)
