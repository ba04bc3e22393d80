"""Reading a campaign file and validating it against the schema; errors name the line and the key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from shardlens.hooks.dictionaries import load as load_dictionary

SCHEMA: dict[str, dict[str, Any]] = {
    "": {"name": str, "model": dict, "cluster": dict, "data": dict, "metric": dict, "experiments": list, "output": dict, "schedule": str,
         "verify": (bool, dict), "dictionaries": list},
    "dictionary": {"path": str, "point": str, "write": str, "error": str},
    "model": {"source": str, "dtype": str},
    "cluster": {"backend": str, "address": (str, type(None)), "stages": int, "replicas": int, "microbatch_size": (int, str, type(None)), "max_memory": (dict, type(None)),
                "stage_resources": (list, type(None))},
    "data": {"path": str, "clean": str, "corrupt": str, "answer": str, "wrong": str, "batch_size": int, "limit": (int, type(None))},
    "metric": {"kind": str},
    "experiment": {"name": str, "kind": str, "points": (str, list), "over": list, "steps": int, "layout": str, "positions": list, "checksum": bool,
                   "k": int, "window": int, "features": (list, type(None)), "sparse": bool,  # k ... sparse: top_contexts
                   "shard_rows": int, "shuffle_buffer": (int, type(None)), "seed": int, "dtype": (str, type(None))},  # activations
    "output": {"path": str, "plots": bool},
    "verify": {"examples": int, "tolerance": (float, int, str)},  # str: PyYAML reads 1e-4 (no dot) as text
}
REQUIRED = {"": ("name", "model", "data", "experiments", "output"), "model": ("source",), "data": ("path",), "dictionary": ("path",),
            "experiment": ("name", "kind", "points"), "output": ("path",)}
CHOICES = {("dictionary", "error"): ("add", "freeze", "drop"), ("model", "dtype"): ("float32", "bfloat16", "float16"), ("cluster", "backend"): ("ray", "local"),
           ("metric", "kind"): ("logit_diff", "prob", "log_prob", "loss"), ("experiment", "kind"): ("sweep", "atp", "ig", "extract", "top_contexts",
                                                                                                                "activations"),
           ("experiment", "layout"): ("example", "token"), ("experiment", "dtype"): ("float32", "bfloat16", "float16"), ("cluster", "microbatch_size"): ("auto",)}  # or an int


class CampaignError(ValueError):
    """A campaign file that breaks the schema: names the file, the line and the key."""


class _Loader(yaml.SafeLoader):
    """A YAML loader whose mappings remember the line of each key."""


class _Lines(dict):
    lines: dict


def _mapping(loader: _Loader, node: yaml.MappingNode) -> _Lines:
    result = _Lines(loader.construct_mapping(node, deep=True))
    result.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass(frozen=True)
class Campaign:
    """A parsed, validated campaign file."""

    path: Path
    name: str
    model: dict
    cluster: dict
    data: dict
    metric: dict
    experiments: tuple
    output: dict
    schedule: Optional[str] = None
    verify: Optional[dict] = None  # None: no check before the first unit; else verify()'s examples / tolerance, as given
    dictionaries: tuple = ()  # the dictionaries spliced in for every run: sl.dictionaries.load's path, point, write, error

    @property
    def model_source(self) -> str:
        """The model's checkpoint: a folder relative to this file when one is there (as an absolute path), else
        the source as written (a path or a hub id)."""
        source = self.model["source"]
        local = self.path.parent / source
        return os.path.abspath(local) if not os.path.isabs(source) and local.exists() else source

    @property
    def output_path(self) -> Path:
        out = Path(self.output["path"])
        return out if out.is_absolute() else self.path.parent / out

    @property
    def data_path(self) -> Path:
        data = Path(self.data["path"])
        return data if data.is_absolute() else self.path.parent / data

    def dictionary_specs(self) -> list:
        """The specs that splice the campaign's dictionaries in (paths relative to this file;
        the workers read the weights, the driver only their headers)."""
        specs = []
        for entry in self.dictionaries:
            path = entry["path"] if "://" in entry["path"] or os.path.isabs(entry["path"]) else str(self.path.parent / entry["path"])
            specs.append(load_dictionary(path, point=entry.get("point"), write=entry.get("write"), error=entry.get("error", "add")))
        return specs


def _check(section: str, values: Any, file: str, line: int) -> None:
    where = f"{file}:{line}"
    if not isinstance(values, dict):
        raise CampaignError(f"{where}: {section or 'the campaign'} must be a mapping")
    lines = getattr(values, "lines", {})
    for key, value in values.items():
        at = f"{file}:{lines.get(key, line)}"
        if key not in SCHEMA[section]:
            raise CampaignError(f"{at}: unknown key {key!r} in {section or 'the campaign'}; known: {', '.join(SCHEMA[section])}")
        expected = SCHEMA[section][key]
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is int):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise CampaignError(f"{at}: {section + '.' if section else ''}{key} must be {names}; got {value!r}")
        choices = CHOICES.get((section, key))
        if choices and isinstance(value, str) and value not in choices:
            raise CampaignError(f"{at}: {section}.{key} must be one of {', '.join(choices)}; got {value!r}")
    for key in REQUIRED.get(section, ()):
        if key not in values:
            raise CampaignError(f"{where}: {section or 'the campaign'} lacks {key!r}")


def load_campaign(path: os.PathLike) -> Campaign:
    """Parse and validate a campaign file; errors name the line."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise CampaignError(f"{path}: not valid YAML: {error}") from None
    except OSError as error:
        raise CampaignError(f"{path}: cannot read: {error.strerror}") from None
    file = str(path)
    _check("", raw, file, 1)
    for section in ("model", "cluster", "data", "metric", "output"):
        if section in raw:
            _check(section, raw[section], file, raw.lines[section])
    for entry in raw.get("dictionaries", ()):
        _check("dictionary", entry, file, getattr(entry, "line", raw.lines["dictionaries"]))
    names = set()
    for experiment in raw["experiments"]:
        _check("experiment", experiment, file, getattr(experiment, "line", raw.lines["experiments"]))
        if experiment["name"] in names:
            raise CampaignError(f"{file}:{experiment.line}: two experiments are named {experiment['name']!r}")
        names.add(experiment["name"])
        if experiment["kind"] == "top_contexts":
            from shardlens.tracer.campaign.top_contexts import check_experiment  # it imports this module

            check_experiment(experiment, file)
        if experiment["kind"] == "activations":
            from shardlens.tracer.campaign.activations import check_experiment as check_activations  # it imports this module

            check_activations(experiment, file)
    return Campaign(
        path=path, name=raw["name"], model=dict(raw["model"]), cluster=dict(raw.get("cluster", {})), data=dict(raw["data"]),
        metric=dict(raw.get("metric", {"kind": "logit_diff"})), experiments=tuple(dict(e) for e in raw["experiments"]),
        output=dict(raw["output"]), schedule=raw.get("schedule"), verify=_verify(raw, file),
        dictionaries=tuple(dict(d) for d in raw.get("dictionaries", ())),
    )


def _verify(raw: dict, file: str) -> Optional[dict]:
    """The verify key: None when absent or false, {} when true, else its checked mapping."""
    value = raw.get("verify", False)
    if isinstance(value, bool):
        return {} if value else None
    _check("verify", value, file, raw.lines["verify"])
    at = lambda key: f"{file}:{value.lines.get(key, raw.lines['verify'])}"  # noqa: E731
    checked = dict(value)
    if "examples" in checked and checked["examples"] < 1:
        raise CampaignError(f"{at('examples')}: verify.examples must be a positive int; got {checked['examples']!r}")
    if "tolerance" in checked:
        try:
            checked["tolerance"] = float(checked["tolerance"])
        except ValueError:
            checked["tolerance"] = -1.0
        if isinstance(value["tolerance"], bool) or not checked["tolerance"] > 0:
            raise CampaignError(f"{at('tolerance')}: verify.tolerance must be a positive number such as 1.0e-4; got {value['tolerance']!r}")
    return checked
