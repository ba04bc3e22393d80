"""Which attention heads of a (random) ToyTransformer matter most for its loss?

Zero-ablates each head's output (hook_z) in turn and prints the change in loss.

    .venv/bin/python examples/ablate_heads.py
"""

import torch

from shardlens.hooks.toy import ToyTransformer


def main() -> None:
    torch.manual_seed(0)
    model = ToyTransformer(n_layers=2, d_model=32, n_heads=4).eval()
    tokens = torch.randint(0, 50, (4, 16))
    with torch.no_grad():
        base = model(tokens, return_type="loss").item()
        print(f"clean loss {base:.4f}")
        for layer in range(2):
            for head in range(4):
                def ablate(z, hook, head=head):  # z: [batch, pos, head, d_head]
                    z[:, :, head] = 0
                    return z

                loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
                print(f"L{layer}H{head}: loss {loss.item():.4f} ({loss.item() - base:+.4f})")


if __name__ == "__main__":
    main()
