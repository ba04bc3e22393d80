"""What the experiment kinds share: the hook points an experiment names, its own keys with
their defaults, the line of a key in the campaign file, and the record of the campaign
settings its results depend on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shardlens.hooks.names import names_predicate
from shardlens.tracer.campaign.schema import Campaign, CampaignError


def hook_points(experiment: Mapping, names: Sequence[str]) -> list[str]:
    """The hook points an experiment's `points` names, in the runner's order."""
    selected = names_predicate(experiment["points"], list(names))
    return [n for n in names if selected(n)]


def option(experiment: Mapping, key: str, defaults: Mapping[str, Any]) -> Any:
    """An experiment's value of one of its kind's keys, or the kind's default."""
    return experiment.get(key, defaults[key])


def key_line(experiment: Mapping, file: str, key: str) -> str:
    """"file:line" of `key` in the campaign file (the experiment's own line when the key is absent)."""
    lines, line = getattr(experiment, "lines", {}), getattr(experiment, "line", 0)
    return f"{file}:{lines.get(key, line)}"


def check_at_least(experiment: Mapping, file: str, least: Mapping[str, int], defaults: Mapping[str, Any]) -> None:
    """Refuse int keys below their least value (None passes: a default chosen later), naming the line."""
    for key, minimum in least.items():
        value = option(experiment, key, defaults)
        if value is not None and value < minimum:
            raise CampaignError(f"{key_line(experiment, file, key)}: experiment.{key} must be an int >= {minimum}; got {value!r}")


def made_by(campaign: Campaign, *, data: Iterable[str]) -> dict:
    """The campaign settings an experiment's results depend on besides its own keys: the
    model, the dictionaries spliced into it, and the data keys named."""
    return {"model": dict(campaign.model), "dictionaries": [dict(d) for d in campaign.dictionaries],
            "data": {key: campaign.data.get(key) for key in data}}
