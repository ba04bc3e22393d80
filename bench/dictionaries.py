"""What a spliced dictionary costs: a forward with an SAE spliced in, against the forward
without it and the bare matmuls the SAE adds.

A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192), batch 8 x 64
tokens, a JumpReLU SAE of 16 x 768 = 12,288 latents at blocks.6.hook_resid_post (saved as
a safetensors file, loaded by reference). Timed in this process under torch.no_grad, each
the median of --repeats rounds in which the runs take turns:

- the plain forward (logits, no hooks);
- the bare matmuls: encode (x @ W_enc + b_enc, the JumpReLU) and decode (z @ W_dec + b_dec)
  of the same activations, written out in plain torch;
- the forward with the SAE spliced in (error term added back: the logits are the model's),
  alone, with its latents cached, and with one latent clamped (which decodes twice: the
  edited latents and, for the error term, the unedited ones).

The overhead is (spliced forward - plain forward) / bare matmuls: 1.0 means the splice
costs exactly the matmuls it must add.

    .venv/bin/python bench/dictionaries.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from timing import save_gpt2_small

import shardlens as sl

POINT = "blocks.6.hook_resid_post"
LATENTS = POINT + ".sae.hook_latents"
D_MODEL, D_SAE = 768, 16 * 768


def sae_weights() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL ** 0.5, "b_enc": torch.zeros(D_SAE),
            "W_dec": torch.randn(D_SAE, D_MODEL, generator=g) / D_SAE ** 0.5, "b_dec": torch.zeros(D_MODEL),
            "threshold": torch.full((D_SAE,), 0.5)}


def interleaved_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Each run's median seconds, the runs taking turns in every round (after one warm-up
    round), so that a slow spell of a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        save_gpt2_small(folder)
        weights = sae_weights()
        save_file(weights, Path(folder) / "sae.safetensors")
        model = sl.HookedModel.from_pretrained(folder)
        spec = sl.dictionaries.load(Path(folder) / "sae.safetensors", point=POINT)
        tokens = torch.randint(3, 8192, (8, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=POINT)
            x = cache[POINT]

            def bare() -> torch.Tensor:
                pre = x @ weights["W_enc"] + weights["b_enc"]
                z = torch.relu(pre) * (pre > weights["threshold"])
                return z @ weights["W_dec"] + weights["b_dec"]

            clamp = sl.HookSpec(LATENTS, sl.ops.Patch(5.0, features=[7]))
            runs = {
                "plain forward": lambda: model(tokens),
                "bare SAE matmuls": bare,
                "spliced forward": lambda: model.run_with_hooks(tokens, fwd_hooks=[spec]),
                "spliced, latents cached": lambda: model.run_with_cache(tokens, fwd_hooks=[spec], names_filter=LATENTS),
                "spliced, one latent clamped": lambda: model.run_with_hooks(tokens, fwd_hooks=[spec, clamp]),
            }
            timings = interleaved_medians(runs, args.repeats)
            assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=[spec]), model(tokens))
    plain, matmuls = timings["plain forward"], timings["bare SAE matmuls"]
    print(f"GPT-2-small shape, batch 8 x 64, JumpReLU SAE d_sae={D_SAE} at {POINT}; median of {args.repeats}")
    for name, seconds in timings.items():
        overhead = f"   overhead / bare matmuls: {(seconds - plain) / matmuls:.2f}" if name.startswith("spliced") else ""
        print(f"  {name:30s} {seconds * 1000:8.1f} ms{overhead}")


if __name__ == "__main__":
    main()
