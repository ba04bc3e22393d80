"""Metrics: serialisable scores of a model's logits, evaluated where the logits are (the
last stage of a pipeline). Each scores every example at its last real (non-padding)
position; its value is the mean over the batch (one mean per copy of a batch made of
copies: see Metric.per_copy).

Example:
    >>> metric = sl.metrics.logit_diff(answer=[12, 7], wrong=[3, 9])
    >>> metric(logits, attention_mask)          # tensor of shape [] (the batch mean)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from shardlens.hooks.codec import serializable

KINDS = ("logit_diff", "prob", "log_prob", "loss")


def _ids(value: Any, name: str) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be token ids, one per example; got {value!r}")


@serializable
@dataclass(frozen=True)
class Metric:
    """A score of logits: kind, and the answer / wrong token id of each example. With
    `copies` > 1 the batch is that many copies of a batch (see per_copy), and its value is
    the mean over each copy, [copies]."""

    kind: str
    answer: Optional[tuple] = None
    wrong: Optional[tuple] = None
    copies: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not isinstance(self.copies, int) or isinstance(self.copies, bool) or self.copies < 1:
            raise ValueError(f"metric copies must be a positive int; got {self.copies!r}")
        object.__setattr__(self, "answer", _ids(self.answer, "answer"))
        object.__setattr__(self, "wrong", _ids(self.wrong, "wrong"))
        needs = {"logit_diff": ("answer", "wrong"), "prob": ("answer",), "log_prob": ("answer",), "loss": ()}[self.kind]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"metric {self.kind} needs {name}= token ids")

    def rows(self, rows: slice) -> "Metric":
        """The metric for a slice of the batch (each example keeps its own answer)."""
        pick = lambda ids: ids if ids is None or len(ids) == 1 else ids[rows]  # noqa: E731
        return replace(self, answer=pick(self.answer), wrong=pick(self.wrong))

    def repeat(self, times: int) -> "Metric":
        """The metric for a batch made of `times` copies of the batch, one after another
        (its value: the mean over all of them)."""
        return replace(self, answer=None if self.answer is None else self.answer * times,
                       wrong=None if self.wrong is None else self.wrong * times)

    def per_copy(self, copies: int) -> "Metric":
        """As repeat(copies), valued per copy: [copies] means (what sweeps score each cell's
        copy of the batch by, where the logits are)."""
        return replace(self.repeat(copies), copies=copies)

    def per_example(self, logits: Tensor, attention_mask: Optional[Tensor] = None, tokens: Optional[Tensor] = None) -> Tensor:
        """The score of each example, [batch], in float32."""
        batch = logits.shape[0]
        if self.kind == "loss":
            if tokens is None:
                raise ValueError("the loss metric needs the tokens")
            log_probs = logits[:, :-1].float().log_softmax(-1)
            nll = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
            if attention_mask is None:
                return nll.mean(-1)
            valid = (attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()).to(logits.device)
            return (nll * valid).sum(-1) / valid.sum(-1)
        last = logits.shape[1] - 1 if attention_mask is None else None
        if attention_mask is not None:
            positions = torch.arange(attention_mask.shape[1], device=logits.device)
            last = (attention_mask.to(logits.device).bool() * positions).argmax(-1)  # the last real position
            final = logits[torch.arange(batch, device=logits.device), last].float()
        else:
            final = logits[:, last].float()
        answer = self._column(self.answer, batch, logits.device)
        if self.kind == "logit_diff":
            wrong = self._column(self.wrong, batch, logits.device)
            return final.gather(-1, answer[:, None])[:, 0] - final.gather(-1, wrong[:, None])[:, 0]
        log_probs = F.log_softmax(final, dim=-1).gather(-1, answer[:, None])[:, 0]
        return log_probs if self.kind == "log_prob" else log_probs.exp()

    def first_read(self, attention_mask: Optional[Tensor], seq_len: int) -> int:
        """The earliest position whose logits the score reads, in any example: 0 for the
        loss, else the earliest last real position."""
        if self.kind == "loss":
            return 0
        if attention_mask is None:
            return seq_len - 1
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return int((attention_mask.bool() * positions).argmax(-1).min())

    @staticmethod
    def _column(ids: tuple, batch: int, device: Any) -> Tensor:
        if len(ids) not in (1, batch):
            raise ValueError(f"the metric has {len(ids)} token ids for a batch of {batch} examples")
        column = torch.tensor(ids, device=device)
        return column.expand(batch) if len(ids) == 1 else column

    def __call__(self, logits: Tensor, attention_mask: Optional[Tensor] = None, tokens: Optional[Tensor] = None) -> Tensor:
        """The batch mean of the per-example scores ([copies] means, one per copy, with copies > 1)."""
        values = self.per_example(logits, attention_mask, tokens)  # [batch]
        if self.copies == 1:
            return values.mean()
        if values.shape[0] % self.copies:
            raise ValueError(f"a metric valued per copy ({self.copies} copies) needs a batch made of them; got a batch of {values.shape[0]}")
        return values.reshape(self.copies, -1).mean(1)  # [copies, batch] -> [copies]


def logit_diff(answer: Any, wrong: Any) -> Metric:
    """logit[answer] - logit[wrong] at each example's last real position."""
    return Metric("logit_diff", answer, wrong)


def prob(answer: Any) -> Metric:
    """The probability of `answer` at each example's last real position."""
    return Metric("prob", answer)


def log_prob(answer: Any) -> Metric:
    """The log-probability of `answer` at each example's last real position."""
    return Metric("log_prob", answer)


def loss() -> Metric:
    """The mean next-token loss of each example."""
    return Metric("loss")


__all__ = ["Metric", "log_prob", "logit_diff", "loss", "prob"]
