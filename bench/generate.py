"""Generation speed: HookedModel.generate with and without the key/value cache, and the
unwrapped transformers generate, on the same small random GPT-2, same run.

    .venv/bin/python bench/generate.py [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import shardlens as sl
from timing import median_seconds  # bench/timing.py


def main() -> None:
    parser = argparse.ArgumentParser(description="HookedModel.generate vs transformers generate.")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    tokens = torch.randint(1, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        model = sl.HookedModel.from_pretrained(folder)
        kwargs = dict(max_new_tokens=args.new, stop_at_eos=False)
        with torch.no_grad():
            rows = {
                "transformers generate (greedy)": median_seconds(lambda: hf.generate(tokens, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False), args.repeats),
                "HookedModel.generate, KV cache": median_seconds(lambda: model.generate(tokens, **kwargs), args.repeats),
                "HookedModel.generate, no cache": median_seconds(lambda: model.generate(tokens, use_kv_cache=False, **kwargs), args.repeats),
            }
        same = torch.equal(model.generate(tokens, **kwargs), hf.generate(tokens, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False))
    base = next(iter(rows.values()))
    generated = tokens.shape[0] * args.new
    print(f"GPT-2 shape 4 layers d_model 256, batch 4, prompt 16, {args.new} new tokens; identical tokens: {same}")
    for label, seconds in rows.items():
        print(f"  {label:<34} {generated / seconds:8.1f} tokens/s   {base / seconds:5.2f}x transformers' speed")


if __name__ == "__main__":
    main()
