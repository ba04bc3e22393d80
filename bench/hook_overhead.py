"""Hook overhead, each variant as a ratio to the plain forward timed in the same run.

1. ToyTransformer (12 blocks): plain forward vs run_with_cache on every hook point.
2. Random GPT-2-shaped Hugging Face models, saved as safetensors and loaded back:
   - compute-bound: 12 layers, d_model 768, vocab 8192, batch 8 x 128 tokens;
   - latency-bound: 4 layers, d_model 128, vocab 1024, batch 1 x 16 tokens (per-hook Python
     overhead dominates, as it does on a GPU).
   Variants: plain HF forward; HookedModel with no hooks; run_with_cache of every
   hook_resid_post; run_with_cache of every hook point. With the `bench` extra installed
   (transformer-lens, nnsight), also TransformerLens' TransformerBridge.run_with_cache and an
   nnsight trace saving the block outputs, on the same saved model.
3. The same four variants, compute-bound, on other families' shapes:
   - gemma2: Gemma 2 (8 layers, d_model 768, grouped-query heads, sliding window 64 of the
     128 tokens, attention and final soft-caps, post-attention and post-MLP norms);
   - mixtral: Mixtral (8 layers, d_model 512, 8 experts, top-2, grouped-query heads).

Everything runs under torch.no_grad(); the variants are interleaved round by round so that
drift in machine speed hits all of them alike, and the median of each is reported.

Caching every point holds hundreds of MB per forward, which the plain forward frees as it
goes; on the CPU, fresh memory costs page faults (the kernel zeroes each new page), whatever
holds it. "plain HF + keep every module's output" is that cost with no framework: the plain
forward with torch hooks that keep each module's output until the forward ends. To see the
framework's own cost without the kernel's page zeroing, let glibc keep freed memory for reuse:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=8589934592 .venv/bin/python bench/hook_overhead.py

    .venv/bin/python bench/hook_overhead.py [--only toy|compute|latency|gemma2|mixtral] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

import shardlens as sl
from shardlens.hooks.toy import ToyTransformer, word_tokenizer

CONFIGS = {
    "compute": dict(layers=12, d_model=768, heads=12, vocab=8192, batch=8, pos=128, repeats=5),
    "latency": dict(layers=4, d_model=128, heads=4, vocab=1024, batch=1, pos=16, repeats=200),
}
FAMILY_SHAPES = {  # compute-bound shapes of other families: (model_type, config fields), tokens [8, 128]
    "gemma2": ("gemma2", dict(
        num_hidden_layers=8, hidden_size=768, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=4,
        head_dim=96, vocab_size=8192, sliding_window=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    )),
    "mixtral": ("mixtral", dict(
        num_hidden_layers=8, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=8192, num_local_experts=8, num_experts_per_tok=2,
    )),
}


def median_seconds(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each variant; rounds interleave the variants so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    names = list(variants)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    print(f"\n{title}")
    plain = next(iter(medians.values()))
    for name, seconds in medians.items():
        print(f"  {name:<44} {seconds * 1e3:10.2f} ms   {seconds / plain:6.3f}x")


def toy_section(repeats: int) -> None:
    torch.manual_seed(0)
    model = ToyTransformer(n_layers=12, d_model=256, n_heads=8, d_vocab=1000, n_ctx=128).eval()
    tokens = torch.randint(0, 1000, (8, 128))
    n_points = len(model.hook_names())
    variants = {
        "plain forward": lambda: model(tokens),
        "run_with_hooks (no hooks)": lambda: model.run_with_hooks(tokens),
        f"run_with_cache (all {n_points} points)": lambda: model.run_with_cache(tokens),
    }
    with torch.no_grad():
        report("ToyTransformer: 12 blocks, d_model 256, tokens [8, 128]", median_seconds(variants, repeats))


def save_gpt2_shaped(folder: Path, layers: int, d_model: int, heads: int, vocab: int, pos: int) -> Path:
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=d_model, n_head=heads, vocab_size=vocab, n_positions=max(pos, 128), bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)  # TransformerBridge and nnsight want one
    return folder


def competitor_variants(folder: Path, tokens: torch.Tensor, layers: int) -> dict[str, Callable[[], object]]:
    """TransformerBridge and nnsight on the same checkpoint, when the bench extra is installed."""
    variants: dict[str, Callable[[], object]] = {}
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("  (transformer-lens not installed: it is a test dependency, pip install -e '.[dev]')")
    else:
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
        resid_post = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
        variants["TransformerBridge forward (no hooks)"] = lambda: bridge(tokens)
        variants["TransformerBridge run_with_cache (resid_post)"] = lambda: bridge.run_with_cache(tokens, names_filter=resid_post)
        variants["TransformerBridge run_with_cache (every point)"] = lambda: bridge.run_with_cache(tokens)
    try:
        from nnsight import LanguageModel
    except ImportError:
        print("  (nnsight not installed: pip install -e '.[bench]' to compare with nnsight)")
    else:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        lm = LanguageModel(hf_model, tokenizer=transformers.AutoTokenizer.from_pretrained(folder))

        def nnsight_trace():
            saved = []
            with lm.trace(tokens):
                for i in range(layers):
                    saved.append(lm.transformer.h[i].output.save())
            return saved

        variants["nnsight trace (save block outputs)"] = nnsight_trace
    return variants


def hf_section(name: str, repeats: int | None) -> None:
    c = CONFIGS[name]
    repeats = repeats or c["repeats"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_gpt2_shaped(Path(tmp), c["layers"], c["d_model"], c["heads"], c["vocab"], c["pos"])
        plain = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        hooked = sl.HookedModel.from_pretrained(folder)
        tokens = torch.randint(0, c["vocab"], (c["batch"], c["pos"]), generator=torch.Generator().manual_seed(0))
        variants = {**shardlens_variants(plain, hooked, tokens, "plain HF forward"), **competitor_variants(folder, tokens, c["layers"])}
        title = f"{name}-bound: GPT-2 shape, {c['layers']} layers, d_model {c['d_model']}, vocab {c['vocab']}, tokens [{c['batch']}, {c['pos']}]"
        timed_section(title, variants, repeats)


def timed_section(title: str, variants: dict[str, Callable[[], object]], repeats: int) -> None:
    """Time the variants without gradients and print their ratios to the first."""
    with torch.no_grad():
        medians = median_seconds(variants, repeats)
    report(f"{title}, {repeats} rounds, torch threads {torch.get_num_threads()}", medians)


def shardlens_variants(plain: torch.nn.Module, hooked: sl.HookedModel, tokens: torch.Tensor, label: str) -> dict[str, Callable[[], object]]:
    """The plain forward (first: the baseline), its no-framework ceiling of caching, and the
    HookedModel with no hooks, caching resid_post, and caching every point."""
    n_points = len(hooked.hook_names())
    return {
        label: lambda: plain(tokens).logits,
        "plain HF + keep every module's output": keeping_outputs(plain, tokens),
        "HookedModel (no hooks)": lambda: hooked(tokens),
        "HookedModel run_with_cache (resid_post)": lambda: hooked.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post"),
        f"HookedModel run_with_cache (all {n_points} points)": lambda: hooked.run_with_cache(tokens),
    }


def keeping_outputs(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], object]:
    """The plain forward, holding every module's output (its first tensor) until it returns."""
    kept: list = []

    def keep(module, args, output):
        first = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, tuple) else None
        if isinstance(first, torch.Tensor):
            kept.append(first)

    modules = [m for name, m in model.named_modules() if name and not isinstance(m, torch.nn.ModuleList)]

    def run():
        handles = [m.register_forward_hook(keep) for m in modules]
        try:
            return model(tokens).logits
        finally:
            for handle in handles:
                handle.remove()
            kept.clear()

    return run


def family_section(name: str, repeats: int | None) -> None:
    model_type, fields = FAMILY_SHAPES[name]
    repeats = repeats or 5
    config = transformers.AutoConfig.for_model(model_type, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0, **fields)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        hooked = sl.HookedModel.from_pretrained(tmp)
    tokens = torch.randint(0, config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    variants = shardlens_variants(plain, hooked, tokens, f"plain HF forward ({plain.config._attn_implementation} attention)")
    title = f"compute-bound: {name} shape, {config.num_hidden_layers} layers, d_model {config.hidden_size}, vocab {config.vocab_size}, tokens [8, 128]"
    timed_section(title, variants, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description="Hook overhead as ratios to the plain forward.")
    parser.add_argument("--only", choices=["toy", "compute", "latency", *FAMILY_SHAPES], help="run one section")
    parser.add_argument("--repeats", type=int, help="rounds per section (default: per section)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.only in (None, "toy"):
        toy_section(args.repeats or 20)
    for name in ("compute", "latency"):
        if args.only in (None, name):
            hf_section(name, args.repeats)
    for name in FAMILY_SHAPES:
        if args.only in (None, name):
            family_section(name, args.repeats)


if __name__ == "__main__":
    main()
