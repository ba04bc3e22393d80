"""A campaign's prompt data: rows from JSONL or Parquet, and the token ids of a batch of them."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq
import torch

from shardlens.tracer.campaign.schema import Campaign, CampaignError


def load_rows(campaign: Campaign) -> list[dict]:
    path = campaign.data_path
    if not path.exists():
        raise CampaignError(f"{campaign.path}: data.path {path} does not exist")
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    limit = campaign.data.get("limit")
    return rows[:limit] if limit else rows


def _ids(value: Any, tokenizer: Any, what: str) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise CampaignError(f"{what} is text but the model has no tokenizer: give token ids")
        return tokenizer(value, add_special_tokens=False)["input_ids"]
    if isinstance(value, int):
        return [value]
    return list(value)


def batch_tensors(campaign: Campaign, rows: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Token ids of one data batch: clean, corrupt [batch, pos], answer and wrong [batch]."""
    column = lambda key: campaign.data.get(key, key)  # noqa: E731
    out: dict[str, Any] = {}
    for key in ("clean", "corrupt"):
        if column(key) in rows[0]:
            ids = [_ids(r[column(key)], tokenizer, key) for r in rows]
            if len({len(i) for i in ids}) != 1:
                raise CampaignError(f"{campaign.path}: the {key} prompts of a batch must have the same length in tokens")
            out[key] = torch.tensor(ids)
    for key in ("answer", "wrong"):
        if column(key) in rows[0]:
            out[key] = [_ids(r[column(key)], tokenizer, key)[0] for r in rows]
    return out


def check_fields(campaign: Campaign, rows: list[dict]) -> None:
    """Refuse data that lacks a field the experiments need, before any work."""
    if not rows:
        raise CampaignError(f"{campaign.path}: data.path {campaign.data_path} holds no rows")
    needed = {"clean"}
    if any(e["kind"] not in ("extract", "top_contexts", "activations") for e in campaign.experiments):  # these run the clean prompts alone
        needed |= {"corrupt"} | {"logit_diff": {"answer", "wrong"}, "prob": {"answer"}, "log_prob": {"answer"}}.get(campaign.metric.get("kind", "logit_diff"), set())
    for key in sorted(needed):
        name = campaign.data.get(key, key)
        if name not in rows[0]:
            raise CampaignError(f"{campaign.path}: the rows of {campaign.data_path.name} have no field {name!r} (data.{key}); they have {sorted(rows[0])}")
