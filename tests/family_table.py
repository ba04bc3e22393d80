"""The table of model families in docs/models.md, made by checking each family's tiny checkpoint.

Each cell is the outcome of a check against the unwrapped transformers model:
- names: with every canonical point cached, the logits are transformers' (1e-5) and each
  blocks.{L}.hook_resid_post is transformers' hidden state;
- attention: every pattern row sums to one (to one minus the sinks' share, gpt-oss) and
  hook_z equals pattern @ v;
- sharding: 2 stages built from the checkpoint, chained, give transformers' logits;
- Tracer: a 2-stage Tracer (local backend) gives transformers' logits;
- generation: greedy generation with the key/value cache equals transformers' generate;
- routing (MoE families): hook_router_logits equals the router's own output.

    .venv/bin/python -m tests.family_table           # print the table
    .venv/bin/python -m tests.family_table --write   # and put it into docs/models.md

tests/test_docs.py checks that docs/models.md holds the table these checks make now.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import shardlens as sl
from shardlens.sharding import ShardPlan, StageIO, build_stage
from tests.tiny_models import FAMILY_CONFIGS, load_reference, save_tiny_model

PAGE = Path(__file__).resolve().parent.parent / "docs" / "models.md"
START, END = "<!-- families:start -->", "<!-- families:end -->"
COLUMNS = ("names", "attention", "sharding", "Tracer", "generation", "routing")
ATOL = 1e-5


def _names(model, reference, tokens) -> bool:
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True)
    logits, cache = model.run_with_cache(tokens)
    layers = model.config.num_hidden_layers
    hidden = all(torch.allclose(cache[f"blocks.{i}.hook_resid_post"], expected.hidden_states[i + 1], atol=ATOL) for i in range(layers - 1))
    return hidden and torch.allclose(logits, expected.logits, atol=ATOL)


def _attention(model, reference, tokens) -> bool:
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_v", "blocks.*.attn.hook_z"])
    for layer in range(model.config.num_hidden_layers):
        pattern, v, z = (cache[f"blocks.{layer}.attn.hook_{p}"] for p in ("pattern", "v", "z"))
        sums = pattern.sum(-1)
        if not (torch.allclose(sums, torch.ones_like(sums), atol=1e-6) or (model.config.model_type == "gpt_oss" and (sums < 1).all())):
            return False
        v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)  # grouped-query: each query head's kv head
        if not torch.allclose(torch.einsum("bhqk,bkhd->bqhd", pattern, v), z, atol=1e-6):
            return False
    return True


def _sharding(folder, reference, tokens) -> bool:
    plan = ShardPlan.for_model(folder, stages=2)
    io = StageIO(input_ids=tokens)
    with torch.no_grad():
        for index in range(2):
            io = build_stage(folder, plan, index)(io)
        return torch.allclose(io.logits, reference(tokens).logits, atol=ATOL)


def _tracer(folder, reference, tokens) -> bool:
    with sl.Tracer.from_pretrained(folder, stages=2, backend="local") as tracer:
        logits = tracer(tokens)
    with torch.no_grad():
        return torch.allclose(logits, reference(tokens).logits, atol=ATOL)


def _generation(model, reference, tokens) -> bool:
    with torch.no_grad():
        expected = reference.generate(tokens, max_new_tokens=6, do_sample=False)
    return torch.equal(model.generate(tokens, max_new_tokens=6), expected)


def _routing(model, reference, tokens):
    layers = [i for i in range(model.config.num_hidden_layers) if model.architecture.block_at(i).moe is not None]
    if not layers:
        return None
    seen, blocks = {}, reference.get_submodule(model.architecture.blocks)
    handles = [
        blocks[i].get_submodule(model.architecture.block_at(i).moe.router).register_forward_hook(
            lambda module, args, output, i=i: seen.__setitem__(i, output[0].detach()))
        for i in layers
    ]
    with torch.no_grad():
        reference(tokens)
    for handle in handles:
        handle.remove()
    _, cache = model.run_with_cache(tokens, names_filter="blocks.*.mlp.hook_router_logits")
    return all(torch.allclose(cache[f"blocks.{i}.mlp.hook_router_logits"].flatten(0, 1), seen[i].float(), atol=ATOL) for i in layers)


def _safely(check: Callable, *args):
    try:
        return check(*args)
    except Exception:  # a check that crashes is a failed check: the table says so
        return False


def family_rows(root: Path) -> list[tuple[str, str, list]]:
    """(checkpoint name, model_type, outcome per column: True, False or None for n/a)."""
    tokens = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, (model_type, _) in FAMILY_CONFIGS.items():
        folder = save_tiny_model(name, root / name)
        reference, model = load_reference(folder), sl.HookedModel.from_pretrained(folder)
        outcomes = [
            _safely(_names, model, reference, tokens),
            _safely(_attention, model, reference, tokens),
            _safely(_sharding, folder, reference, tokens),
            _safely(_tracer, folder, reference, tokens),
            _safely(_generation, model, reference, tokens[:1, :5]),
            _safely(_routing, model, reference, tokens),
        ]
        rows.append((name, model_type, outcomes))
    return rows


def render(rows: list[tuple[str, str, list]]) -> str:
    mark = {True: "yes", False: "**no**", None: ""}
    lines = ["| checkpoint | model_type | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    lines += [f"| {name} | `{model_type}` | " + " | ".join(mark[o] for o in outcomes) + " |" for name, model_type, outcomes in rows]
    return "\n".join(lines)


def page_table(text: str) -> str:
    """The table between the markers of docs/models.md."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as root:
        table = render(family_rows(Path(root)))
    print(table)
    if "--write" in argv:
        text = PAGE.read_text()
        head, rest = text.split(START, 1)
        PAGE.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
