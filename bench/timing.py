"""What the benchmarks share (run as scripts: bench/ is on sys.path): timing, and the
GPT-2-small-shaped random model and patching task they run."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_gpt2_small(folder: str) -> None:
    """A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192, 64 positions)
    and a word tokenizer, saved to `folder`; logging of transformers quietened."""
    import torch
    import transformers

    from shardlens.hooks.toy import word_tokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    word_tokenizer(8192).save_pretrained(folder)


def patching_task(batch: int, length: int, corrupted: int) -> tuple:
    """(clean, corrupt) token ids [batch, length] differing at position `corrupted`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 8192, (batch, length), generator=generator)
    corrupt = clean.clone()
    corrupt[:, corrupted] = torch.randint(3, 8192, (batch,), generator=generator)
    return clean, corrupt
