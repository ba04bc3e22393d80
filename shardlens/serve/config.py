"""The tracing service's config file: the models it hosts, the tokens that may use them and
their limits. Errors name the file, the line and the key.

The file is YAML::

    host: 127.0.0.1          # optional; 0.0.0.0 only behind a TLS reverse proxy
    port: 8000               # optional
    address: null            # optional Ray address: null starts a local Ray instance; "auto" or "host:6379" joins a cluster
    limits: {tokens_per_request: 65536, cached_bytes: 1073741824, concurrent: 4, per_minute: 600}
    models:
      - {name: induction, source: ../../shardlens/data/induction, stages: 2, replicas: 1, backend: ray, max_batch: 8}
    tokens:
      - {name: alice, sha256: <64 hex>, limits: {concurrent: 2}, models: [induction]}

- `models` (at least one): `name` (what clients connect with) and `source` (a checkpoint
  folder; a relative one is relative to this file) are required; optional are `dtype`
  (float32, bfloat16, float16), `stages`, `replicas`, `backend` (ray, local),
  `microbatch_size`, `device`, `max_batch` (requests merged into one pipeline run) and
  `max_queue` (requests waiting, past which the service answers 429).
- `tokens`: `name` (who it is, named in error messages) and `sha256` (the hex SHA-256 of the token; never
  the token itself: `shardlens token NAME` makes a token and prints its line) are required;
  `models` (default: all) and `limits` are optional.
- `limits` (each optional): `tokens_per_request` (token ids in one request), `cached_bytes`
  (bytes of results one request may return), `concurrent` (requests of a token queued or
  running at once), `per_minute` (requests a token may start in any 60 s). A token's limits
  are merged over the service's: `limits: {concurrent: 2}` keeps the service's others.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("ray", "local")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ConfigError(ValueError):
    """A service config that breaks the schema: names the file, the line and the key."""


class _FieldError(ValueError):
    """A field whose value breaks its rule; `.path` leads to it ("tokens", 0, "sha256"), so
    load_config can name the line."""

    def __init__(self, path: tuple, rule: str):
        self.path, self.rule = path, rule
        super().__init__(f"{_dotted(path)} {rule}")


def _dotted(path: tuple) -> str:
    """("tokens", 0, "limits", "concurrent") -> "tokens[0].limits.concurrent"."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).lstrip(".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(value: Any, field: str) -> None:
    if not _is_int(value) or value < 1:
        raise _FieldError((field,), f"must be a positive int; got {value!r}")


def _check_name(value: Any, field: str = "name") -> None:
    if not isinstance(value, str) or not value:
        raise _FieldError((field,), f"must be a non-empty string; got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Per-token limits."""

    tokens_per_request: int = 65_536  # token ids in one request (batch x positions, summed over its runs)
    cached_bytes: int = 1 << 30  # bytes of results (cache entries + outputs) one request may return
    concurrent: int = 4  # requests of the token queued or running at once
    per_minute: int = 600  # requests the token may start in any 60 s

    def __post_init__(self):
        for field in fields(self):
            _check_positive(getattr(self, field.name), field.name)


@dataclass(frozen=True)
class TokenEntry:
    """A token that may use the service: who it is, its hash, its limits and its models."""

    name: str  # who it is (named in error messages; never the token)
    sha256: str  # hex sha256 of the token (64 lowercase hex chars)
    limits: Limits = Limits()
    models: Optional[tuple[str, ...]] = None  # the models it may use (None: all)

    def __post_init__(self):
        _check_name(self.name)
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            got = f"a string of {len(self.sha256)} characters" if isinstance(self.sha256, str) else repr(self.sha256)  # it may be a raw token: not echoed
            raise _FieldError(("sha256",), f"must be the token's hex SHA-256, 64 lowercase hex characters (`shardlens token NAME` prints one); got {got}")
        if not isinstance(self.limits, Limits):
            raise _FieldError(("limits",), f"must be a Limits; got {self.limits!r}")
        if self.models is not None and not (isinstance(self.models, tuple) and all(isinstance(m, str) for m in self.models)):
            raise _FieldError(("models",), f"must be None (all models) or a tuple of model names; got {self.models!r}")


@dataclass(frozen=True)
class ModelEntry:
    """A model the service hosts: its name for clients, its checkpoint and how it runs."""

    name: str  # the name clients connect with: sl.connect(url, model=name)
    source: str  # checkpoint folder (load_config makes a relative one absolute, from the config file's folder)
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 | None (the checkpoint's own)
    stages: int = 1
    replicas: int = 1  # pipeline replicas of the Tracer (data parallel)
    backend: str = "ray"  # ray | local
    microbatch_size: Optional[int] = None
    device: Optional[str] = None
    max_batch: int = 8  # requests of different clients merged into one pipeline run at most
    max_queue: int = 256  # requests waiting for this model at most (more: 429)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _MODEL_NAME.fullmatch(self.name):
            raise _FieldError(("name",), f"must be letters, digits, '_', '.' and '-', starting with a letter or digit; got {self.name!r}")
        _check_name(self.source, "source")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise _FieldError(("dtype",), f"must be one of {', '.join(DTYPES)} or null (the checkpoint's own); got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise _FieldError(("backend",), f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for field in ("stages", "replicas", "max_batch", "max_queue"):
            _check_positive(getattr(self, field), field)
        if self.microbatch_size is not None:
            _check_positive(self.microbatch_size, "microbatch_size")
        if self.device is not None:
            _check_name(self.device, "device")


@dataclass(frozen=True)
class ServiceConfig:
    """A parsed, validated service config: the models it hosts and the tokens that may use them."""

    models: tuple[ModelEntry, ...]
    tokens: tuple[TokenEntry, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    address: Optional[str] = None  # Ray address: None starts a local Ray instance; "auto" or "host:6379" joins a cluster
    limits: Limits = Limits()  # default limits of tokens that give none

    def __post_init__(self):
        if not isinstance(self.models, tuple) or not all(isinstance(m, ModelEntry) for m in self.models):
            raise _FieldError(("models",), f"must be a tuple of ModelEntry; got {self.models!r}")
        if not self.models:
            raise _FieldError(("models",), "must hold at least one model; got none")
        if not isinstance(self.tokens, tuple) or not all(isinstance(t, TokenEntry) for t in self.tokens):
            raise _FieldError(("tokens",), f"must be a tuple of TokenEntry; got {self.tokens!r}")
        _check_unique(self.models, "models", "name")
        _check_unique(self.tokens, "tokens", "name")
        _check_unique(self.tokens, "tokens", "sha256")
        self._check_token_models()
        _check_name(self.host, "host")
        if not _is_int(self.port) or not 1 <= self.port <= 65535:
            raise _FieldError(("port",), f"must be an int from 1 to 65535; got {self.port!r}")
        if self.address is not None:
            _check_name(self.address, "address")

    def _check_token_models(self) -> None:
        known = [model.name for model in self.models]
        for i, token in enumerate(self.tokens):
            for name in token.models or ():
                if name not in known:
                    raise _FieldError(("tokens", i, "models"), f"names {name!r}, which the service does not host; its models: {', '.join(known)}")

    def model(self, name: str) -> ModelEntry:
        """The model clients connect to as `name`; KeyError naming the known ones if none is."""
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"no model {name!r}; the service hosts {', '.join(m.name for m in self.models)}")


def _check_unique(entries: tuple, section: str, field: str) -> None:
    first: dict = {}
    for i, entry in enumerate(entries):
        j = first.setdefault(getattr(entry, field), i)
        if j != i:
            raise _FieldError((section, i, field), f"repeats {section}[{j}]'s ({entries[j].name!r}); each {section[:-1]}'s {field} must be unique")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the config stores instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random bearer token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


_KEYS: dict[str, dict[str, Any]] = {
    "service": {"host": str, "port": int, "address": (str, type(None)), "limits": dict, "models": list, "tokens": list},
    "limits": {field.name: int for field in fields(Limits)},
    "model": {"name": str, "source": str, "dtype": (str, type(None)), "stages": int, "replicas": int, "backend": str,
              "microbatch_size": (int, type(None)), "device": (str, type(None)), "max_batch": int, "max_queue": int},
    "token": {"name": str, "sha256": str, "limits": dict, "models": (list, type(None))},
}
_REQUIRED = {"service": ("models", "tokens"), "model": ("name", "source"), "token": ("name", "sha256")}
_TYPE_NAMES = {str: "a string", int: "an int", dict: "a mapping", list: "a list", type(None): "null"}


class _Loader(yaml.SafeLoader):
    """A YAML loader whose mappings remember their line and the line of each key."""


class _Lines(dict):
    line: int
    lines: dict


def _mapping(loader: _Loader, node: yaml.MappingNode) -> _Lines:
    keys = [key.value for key, _ in node.value]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice", node.value[i][0].start_mark)
    result = _Lines(loader.construct_mapping(node, deep=True))
    result.lines = {key.value: key.start_mark.line + 1 for key, _ in node.value}
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _line(root: Any, path: tuple) -> int:
    """The line of the value at `path` in the parsed file (of the nearest mapping that has one)."""
    node, line = root, getattr(root, "line", 1)
    for step in path:
        if isinstance(node, _Lines) and step in node:
            node, line = node[step], node.lines[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
            line = getattr(node, "line", line)
        else:
            break
    return line


def _error(file: str, root: Any, path: tuple, rule: str) -> ConfigError:
    return ConfigError(f"{file}:{_line(root, path)}: {_dotted(path) or 'the config'} {rule}")


def _check_keys(values: Any, section: str, path: tuple, *, file: str, root: Any) -> None:
    """Refuse a mapping with unknown keys, values of the wrong type or required keys missing."""
    if not isinstance(values, dict):
        raise _error(file, root, path, f"must be a mapping; got {values!r}")
    if section == "token" and "token" in values:
        hint = f" (this token's: sha256: {hash_token(values['token'])})" if isinstance(values["token"], str) else ""
        raise _error(file, root, (*path, "token"), "is a raw token, which the config must not hold: replace it with `sha256: <hex>`, "
                     f"the token's hash{hint}; `shardlens token NAME` makes a new token and prints its line")
    known = _KEYS[section]
    for key, value in values.items():
        if key not in known:
            raise _error(file, root, (*path, key), f"is not a key of {_dotted(path) or 'the config'}; known: {', '.join(known)}")
        expected = known[key] if isinstance(known[key], tuple) else (known[key],)
        if not isinstance(value, expected) or (isinstance(value, bool) and int in expected):
            raise _error(file, root, (*path, key), f"must be {' or '.join(_TYPE_NAMES[t] for t in expected)}; got {value!r}")
    for key in _REQUIRED.get(section, ()):
        if key not in values:
            raise _error(file, root, path, f"lacks the required key {key!r}")


def _build(cls: type, prefix: tuple, *, file: str, root: Any, **kwargs: Any) -> Any:
    """cls(**kwargs), its field errors turned into ConfigErrors that name the line."""
    try:
        return cls(**kwargs)
    except _FieldError as error:
        raise _error(file, root, (*prefix, *error.path), error.rule) from None


def _limits(values: dict, base: Limits, path: tuple, *, file: str, root: Any) -> Limits:
    """The limits a mapping gives, merged over `base` (the keys it leaves out keep base's)."""
    _check_keys(values, "limits", path, file=file, root=root)
    return _build(Limits, path, file=file, root=root, **{**asdict(base), **values})


def _model(index: int, folder: Path, *, file: str, root: Any) -> ModelEntry:
    path, values = ("models", index), root["models"][index]
    _check_keys(values, "model", path, file=file, root=root)
    source = Path(values["source"]).expanduser()
    source = (source if source.is_absolute() else folder / source).resolve()
    if not source.is_dir():
        raise _error(file, root, (*path, "source"), f"is no checkpoint folder: nothing at {source} (a relative source is relative to the config file's folder)")
    return _build(ModelEntry, path, file=file, root=root, **{**values, "source": str(source)})


def _token(index: int, defaults: Limits, *, file: str, root: Any) -> TokenEntry:
    path, values = ("tokens", index), root["tokens"][index]
    _check_keys(values, "token", path, file=file, root=root)
    limits = _limits(values["limits"], defaults, (*path, "limits"), file=file, root=root) if "limits" in values else defaults
    models = None if values.get("models") is None else tuple(values["models"])
    return _build(TokenEntry, path, file=file, root=root, **{**values, "limits": limits, "models": models})


def _read(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None


def load_config(path: os.PathLike | str) -> ServiceConfig:
    """Read and validate a service config (YAML; the format is in this module's docstring).

    Args:
        path: the config file. Relative model sources are relative to its folder.

    Returns the ServiceConfig, model sources absolute and token limits merged over the
    service's. Raises ConfigError naming the file, the line and the key.
    """
    path, file = Path(path), str(path)
    root = _read(path)
    _check_keys(root, "service", (), file=file, root=root)
    limits = _limits(root["limits"], Limits(), ("limits",), file=file, root=root) if "limits" in root else Limits()
    models = tuple(_model(i, path.parent, file=file, root=root) for i in range(len(root["models"])))
    tokens = tuple(_token(i, limits, file=file, root=root) for i in range(len(root["tokens"])))
    settings = {key: root[key] for key in ("host", "port", "address") if key in root}
    return _build(ServiceConfig, (), file=file, root=root, models=models, tokens=tokens, limits=limits, **settings)
