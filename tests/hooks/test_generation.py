"""Generation and the key/value cache against transformers' generate and full forwards."""

import pytest
import torch

import shardlens as sl
from tests.tiny_models import FAMILIES, load_reference


def load_pair(tiny_checkpoints, name):
    source = tiny_checkpoints[name]
    return sl.HookedModel.from_pretrained(source), load_reference(source)


# sliding windows (4 tokens) shorter than prompt + generation: Mistral, Gemma 2
@pytest.fixture(params=["gpt2", "llama_gqa", "mistral", "gemma2"])
def pair(request, tiny_checkpoints):
    return load_pair(tiny_checkpoints, request.param)


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_greedy_equals_transformers_generate(tiny_checkpoints, name, tokens, use_kv_cache):
    model, hf = load_pair(tiny_checkpoints, name)
    with torch.no_grad():
        expected = hf.generate(tokens, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(tokens, max_new_tokens=10, use_kv_cache=use_kv_cache), expected)


def test_left_padded_batch_generates_what_each_example_does_alone(pair, tokens):
    model, hf = pair
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    batch = model.generate(tokens, attention_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        assert torch.equal(batch, hf.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False))
    for row, start in ((0, 2), (1, 0), (2, 0)):
        alone = model.generate(tokens[row, start:], max_new_tokens=8)
        assert torch.equal(batch[row, 6:], alone[0, 6 - start:]), row


def test_a_frozen_prefix_cache_gives_the_full_forwards_logits(pair, tokens):
    model, _ = pair
    prefix, suffix_a, suffix_b = tokens[:, :4], tokens[:, 4:], tokens[:, 3:].flip(1)
    cache = sl.KeyValueCache.init_cache(model.config, batch_size=3)
    with torch.no_grad():
        model(prefix, past_kv_cache=cache)
        cache.freeze()
        for suffix in (suffix_a, suffix_b):
            logits = model(suffix, past_kv_cache=cache)
            full = model(torch.cat([prefix, suffix], dim=1))
            assert torch.allclose(logits, full[:, 4:], atol=1e-5)
    assert cache.seq_len == 4 and cache[0].past_keys.shape[:2] == (3, 4)
    n_kv = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
    assert cache.entries[1].past_values.shape[2] == n_kv


def test_a_run_that_fails_midway_leaves_a_growing_cache_as_it_was(pair, tokens):
    model, _ = pair
    cache = sl.KeyValueCache.init_cache(model.config, batch_size=3)
    last = model.config.num_hidden_layers - 1

    def fail(x, hook):
        raise RuntimeError("hook failed")

    with torch.no_grad():
        model(tokens[:, :3], past_kv_cache=cache)
        with pytest.raises(RuntimeError, match="hook failed"):  # layers 0..last-1 ran first
            model.run_with_hooks(tokens[:, 3:5], past_kv_cache=cache, fwd_hooks=[(f"blocks.{last}.hook_resid_mid", fail)])
        assert cache.seq_len == 3 and all(entry.past_keys.shape[1] == 3 for entry in cache.entries)
        logits = model(tokens[:, 3:], past_kv_cache=cache)
        assert torch.allclose(logits, model(tokens)[:, 3:], atol=1e-5)
    assert cache.seq_len == 6


def test_steering_while_generating_equals_a_manual_loop(pair, tokens):
    model, _ = pair
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    steer = sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Add(vector))
    generated = model.generate(tokens, max_new_tokens=6, fwd_hooks=[steer])
    manual = tokens
    with torch.no_grad():
        for _ in range(6):  # the whole sequence every step, the same hook
            logits = model.run_with_hooks(manual, fwd_hooks=[steer])
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)
    assert not torch.equal(generated, model.generate(tokens, max_new_tokens=6))


def test_reading_specs_store_each_step(pair, tokens):
    model, _ = pair
    store = {}
    model.generate(tokens, max_new_tokens=3, fwd_hooks=[sl.HookSpec("hook_logits", sl.ops.Cache())], store=store, stop_at_eos=False)
    assert sorted(store) == ["hook_logits.step0", "hook_logits.step1", "hook_logits.step2"]
    assert store["hook_logits.step0"].shape[1] == 6 and store["hook_logits.step2"].shape[1] == 1  # the prompt, then one token


def test_sampling_is_seeded_and_top_k_one_is_greedy(pair, tokens):
    model, _ = pair
    first = model.generate(tokens, max_new_tokens=5, temperature=1.0, seed=3)
    assert torch.equal(first, model.generate(tokens, max_new_tokens=5, temperature=1.0, seed=3))
    assert torch.equal(model.generate(tokens, max_new_tokens=5, temperature=0.7, top_k=1, seed=0), model.generate(tokens, max_new_tokens=5))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens, max_new_tokens=2, temperature=-1.0)
