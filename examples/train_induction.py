"""Train the demo model: a 2-layer attention-only Llama that forms induction heads.

Sequences are a random half followed by the same half again; the loss is taken on the
second half, which only an induction mechanism (attend to the token after the earlier copy
of the current token) can predict. The MLPs are zeroed and frozen, so the model is
attention-only while staying an ordinary transformers Llama checkpoint. Deterministic:
fixed seeds, one thread.

    .venv/bin/python examples/train_induction.py [--out shardlens/data/induction]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from shardlens.hooks.toy import word_tokenizer

VOCAB, HALF = 64, 12
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "shardlens" / "data" / "induction"


def repeated_halves(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, 2 * HALF] token ids: a random half (ids 3 .. VOCAB-1), then the same half."""
    half = torch.randint(3, VOCAB, (batch, HALF), generator=generator)
    return torch.cat([half, half], dim=1)


def build_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2 * HALF, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:  # attention-only: the MLPs add exactly zero
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
        layer.mlp.requires_grad_(False)
    return model


def train(steps: int = 300, batch: int = 64, lr: float = 3e-3) -> tuple[transformers.LlamaForCausalLM, float]:
    torch.set_num_threads(1)
    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    second_half_loss = float("nan")
    for step in range(steps):
        tokens = repeated_halves(batch, generator)
        logits = model(tokens).logits
        # predictions of the second half: positions HALF-1 .. 2*HALF-2 predict tokens HALF .. 2*HALF-1
        loss = torch.nn.functional.cross_entropy(logits[:, HALF - 1:-1].flatten(0, 1), tokens[:, HALF:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        second_half_loss = loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  second-half loss {second_half_loss:.4f}")
    return model.eval(), second_half_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    model, loss = train(args.steps)
    if loss > 0.05:
        raise SystemExit(f"training ended at second-half loss {loss:.4f} (> 0.05): no induction heads yet")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    word_tokenizer(VOCAB).save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
