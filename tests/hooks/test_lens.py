"""TransformerLens' model surface (shardlens.hooks.lens): cfg, token helpers, weight views,
and TransformerLens' own patching code run on a HookedModel.

References: the HF config and modules (their own forward, captured with plain torch hooks,
and the way each HF attention splits its fused projection), the activations a hooked run
caches, and shardlens' own patching sweep for TransformerLens' patching functions.
"""

from contextlib import contextmanager
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch

import shardlens as sl
from shardlens.hooks.lens import WeightViewError, single_token, str_tokens
from shardlens.hooks.toy import word_tokenizer
from tests.tiny_models import FAMILIES, MOE_FAMILIES, VOCAB

ATOL = 1e-5
DENSE_FAMILIES = [f for f in FAMILIES if f not in MOE_FAMILIES]
PROJECTED_FAMILIES = [f for f in FAMILIES if f != "deepseek_v3"]  # latent attention has no W_Q / W_K / W_V


def load(tiny_checkpoints, family):
    return sl.HookedModel.from_pretrained(tiny_checkpoints[family], dtype=torch.float32)


@pytest.fixture
def tokens():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def block(model, layer):
    return model.model.get_submodule(model.architecture.blocks)[layer]


def block_module(model, layer, field):
    return block(model, layer).get_submodule(getattr(model.architecture.block_at(layer), field))


@contextmanager
def recorded(modules):
    """name -> (first input, output) of each HF module in the runs inside the block (copies:
    Falcon adds into its MLP's output in place)."""
    seen = {}

    def hook(name):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = (x.detach().clone(), out.detach().clone())
        return record

    handles = [module.register_forward_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------- cfg

ACTIVATION_FIELD = {"gpt2": "activation_function", "gptj": "activation_function", "falcon": "activation",
                    "gemma2": "hidden_activation", "gemma3_text": "hidden_activation", "gemma3": "hidden_activation"}


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_fields_equal_the_hf_config_and_module_shapes(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    config, full_config = model.config, model.model.config
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (config.num_hidden_layers, config.hidden_size, config.num_attention_heads)
    assert (cfg.d_vocab, cfg.d_vocab_out, cfg.n_ctx) == (config.vocab_size, config.vocab_size, config.max_position_embeddings)
    assert cfg.act_fn == getattr(config, ACTIVATION_FIELD.get(full_config.model_type, "hidden_act"))
    final_norm = model.model.get_submodule(model.architecture.final_norm)
    eps = getattr(final_norm, "eps", getattr(final_norm, "variance_epsilon", None))
    assert cfg.eps == (1e-5 if eps is None else eps)  # OLMo's LayerNorm names none: it uses 1e-5
    assert cfg.normalization_type == ("RMS" if "RMSNorm" in type(final_norm).__name__ else "LN")
    assert cfg.positional_embedding_type == ("standard" if family == "gpt2" else "rotary")
    assert (cfg.device, cfg.dtype, cfg.n_devices) == ("cpu", torch.float32, 1)
    assert cfg.tie_word_embeddings == config.tie_word_embeddings
    assert cfg.original_architecture == full_config.architectures[0]
    # sizes: those of the activations a run gives
    dense = next(layer for layer in range(cfg.n_layers) if model.architecture.block_at(layer).moe is None) if family not in (
        "mixtral", "qwen3_moe", "olmoe", "gpt_oss") else None
    names = ["blocks.0.attn.hook_k", "blocks.0.attn.hook_z"] + ([f"blocks.{dense}.mlp.hook_post"] if dense is not None else [])
    _, cache = model.run_with_cache(tokens, names_filter=names)
    assert cfg.n_key_value_heads == cache["blocks.0.attn.hook_k"].shape[2]
    assert cfg.d_head == cache["blocks.0.attn.hook_z"].shape[3] == block_module(model, 0, "o_proj").weight.numel() // (
        cfg.n_heads * cfg.d_model)
    if dense is not None:
        assert cfg.d_mlp == cache[f"blocks.{dense}.mlp.hook_post"].shape[2]
    else:  # every layer routes: one expert's size
        assert cfg.d_mlp == (getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    if family in MOE_FAMILIES:
        experts = next(getattr(config, n) for n in ("num_local_experts", "num_experts", "n_routed_experts") if hasattr(config, n))
        assert (cfg.num_experts, cfg.experts_per_token) == (experts, config.num_experts_per_tok)
    else:
        assert cfg.num_experts is None


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "falcon_7b", "gptj", "gpt_neox"])
def test_cfg_fields_read_from_the_config_per_family(tiny_checkpoints, family):
    model = load(tiny_checkpoints, family)
    cfg, config = model.cfg, model.config
    expected = {  # built on demand: each reads fields only its family's config has
        "llama_gqa": lambda: dict(n_key_value_heads=2, gated_mlp=True, parallel_attn_mlp=False, attn_types=None, window_size=None),
        "gemma2": lambda: dict(n_key_value_heads=2, attn_types=("local", "global", "local"), window_size=4, attn_scores_soft_cap=5.0,
                               output_logits_soft_cap=3.0),
        "falcon_7b": lambda: dict(n_key_value_heads=1, d_mlp=config.ffn_hidden_size, parallel_attn_mlp=True, gated_mlp=False),
        "gptj": lambda: dict(d_mlp=config.n_inner, parallel_attn_mlp=True, output_logits_soft_cap=-1.0),
        "gpt_neox": lambda: dict(parallel_attn_mlp=config.use_parallel_residual, d_mlp=config.intermediate_size),
    }[family]()
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_cfg_is_frozen_follows_the_point_options_and_validates(tiny_checkpoints):
    model = load(tiny_checkpoints, "gpt2")
    with pytest.raises(FrozenInstanceError):
        model.cfg.n_layers = 1
    assert not model.cfg.use_split_qkv_input
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    assert model.cfg.use_split_qkv_input and model.cfg.use_attn_result and not model.cfg.use_attn_in
    assert model.cfg.to_dict()["n_heads"] == 4
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of n_key_value_heads=3"):
        replace(model.cfg, n_key_value_heads=3)
    with pytest.raises(ValueError, match="normalization_type='BN'"):
        replace(model.cfg, normalization_type="BN")


# ------------------------------------------------------------------------------- tokens


def test_str_tokens_of_text_ids_and_lists():
    tokenizer = word_tokenizer(VOCAB)  # "<pad>", "<eos>", "<unk>", then "w0" is id 3
    assert str_tokens(tokenizer, "w1 w2 w3") == ["w1", "w2", "w3"]
    assert str_tokens(tokenizer, torch.tensor([4, 5, 6])) == ["w1", "w2", "w3"]
    assert str_tokens(tokenizer, torch.tensor([[4, 5]])) == ["w1", "w2"]
    assert str_tokens(tokenizer, np.array([[7]])) == ["w4"]
    assert str_tokens(tokenizer, [4, 5]) == ["w1", "w2"]
    assert str_tokens(tokenizer, torch.tensor(6)) == ["w3"]
    assert str_tokens(tokenizer, ["w1 w2", "w9"]) == [["w1", "w2"], ["w9"]]
    assert str_tokens(tokenizer, [[4], torch.tensor([5, 6])]) == [["w1"], ["w2", "w3"]]
    with pytest.raises(ValueError, match=r"\[pos\] or \[1, pos\]; got shape \(2, 2\)"):
        str_tokens(tokenizer, torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(TypeError, match="integers"):
        str_tokens(tokenizer, torch.tensor([1.0]))
    assert str_tokens(tokenizer, []) == []
    assert str_tokens(tokenizer, [np.int64(4)]) == ["w1"]
    with pytest.raises(ValueError, match="has no BOS token"):
        str_tokens(tokenizer, "w1", prepend_bos=True)


def test_str_tokens_decode_each_byte_level_token_on_its_own():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "the dog sat"] * 20, vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>")
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    text = "the cat sat on a mat"
    ids = tokenizer(text)["input_ids"]
    pieces = str_tokens(tokenizer, text)
    assert len(pieces) == len(ids) > 1 and "".join(pieces) == text
    assert pieces == [tokenizer.decode([i]) for i in ids]
    assert str_tokens(tokenizer, text, prepend_bos=True) == ["<s>"] + pieces
    assert str_tokens(tokenizer, text, prepend_bos=False) == pieces


def test_single_token_is_the_id_of_one_token_and_refuses_more():
    tokenizer = word_tokenizer(VOCAB)
    assert single_token(tokenizer, "w5") == 8
    with pytest.raises(ValueError, match=r"'w1 w2' is not a single token: it encodes to 2 tokens \['w1', 'w2'\]"):
        single_token(tokenizer, "w1 w2")
    with pytest.raises(ValueError, match="encodes to 0 tokens"):
        single_token(tokenizer, "")


# ------------------------------------------------------------------------- weight views


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_rows_are_hook_embed_and_w_pos_is_for_absolute_positions_only(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    embed = model.model.get_input_embeddings()
    _, cache = model.run_with_cache(tokens, names_filter=["hook_embed"] + (["hook_pos_embed"] if family == "gpt2" else []))
    assert model.W_E.shape == (VOCAB, model.config.hidden_size)
    scale = getattr(embed, "embed_scale", 1.0)  # Gemma scales inside its embedding module
    assert torch.allclose(model.W_E[tokens] * scale, cache["hook_embed"], atol=ATOL)
    if family == "gpt2":
        assert model.W_pos.shape == (model.config.max_position_embeddings, model.config.hidden_size)
        assert torch.equal(model.W_pos[: tokens.shape[1]].expand(2, -1, -1), cache["hook_pos_embed"])
    else:
        with pytest.raises(WeightViewError, match=f"W_pos is only for learned absolute positions; {model.config.model_type}"):
            _ = model.W_pos


def hf_heads(model, layer, projected):
    """(q, k, v) [batch, pos, head, d_head] as the HF attention module splits its projections'
    outputs (`projected`: path -> output); k and v have n_kv heads or, in new-architecture
    Falcon, one copy per query head."""
    attention = block_module(model, layer, "attn")
    config, model_type = model.config, model.config.model_type
    n_heads = config.num_attention_heads
    if model_type == "falcon":
        return attention._split_heads(projected["self_attention.query_key_value"])
    if model_type == "gpt2":
        qkv = projected["attn.c_attn"].split(config.hidden_size, dim=2)
        return tuple(t.unflatten(-1, (n_heads, -1)) for t in qkv)
    if model_type == "gpt_neox":
        return projected["attention.query_key_value"].unflatten(-1, (n_heads, -1)).chunk(3, dim=-1)
    if model_type == "phi3":
        qkv, d_head = projected["self_attn.qkv_proj"], attention.head_dim
        q_end, k_end = n_heads * d_head, (n_heads + attention.num_key_value_heads) * d_head
        return tuple(t.unflatten(-1, (-1, d_head)) for t in (qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]))
    return tuple(projected[path].unflatten(-1, (-1, attention.head_dim)) for path, _ in model.architecture.block.qkv)


@pytest.mark.parametrize("family", PROJECTED_FAMILIES)
def test_query_key_value_weights_give_each_heads_projection(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    paths = [path for path, _ in model.architecture.block.qkv]
    n_layers = model.config.num_hidden_layers
    modules = {(layer, path): block(model, layer).get_submodule(path) for layer in range(n_layers) for path in paths}
    with recorded(modules) as seen:
        _, cache = model.run_with_cache(tokens, names_filter="blocks.*.attn.hook_v")
    W_Q, b_Q, W_K, b_K, W_V, b_V = model.W_Q, model.b_Q, model.W_K, model.b_K, model.W_V, model.b_V
    _W_K, _b_K, _W_V, _b_V = model._W_K, model._b_K, model._W_V, model._b_V
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    assert W_Q.shape == W_K.shape == W_V.shape == (n_layers, n_heads, model.cfg.d_model, model.cfg.d_head)
    assert _W_K.shape == _W_V.shape == (n_layers, n_kv, model.cfg.d_model, model.cfg.d_head)
    assert b_Q.shape == b_K.shape == (n_layers, n_heads, model.cfg.d_head)
    for layer in range(n_layers):
        x = seen[(layer, paths[0])][0]  # what the projections read (ln1's output)
        q, k, v = hf_heads(model, layer, {path: seen[(layer, path)][1] for path in paths})
        for h in range(n_heads):
            assert torch.allclose(x @ W_Q[layer, h] + b_Q[layer, h], q[:, :, h], atol=ATOL), (layer, h)
        for name, ref, stacked, bias, grouped, grouped_bias in (("k", k, W_K, b_K, _W_K, _b_K), ("v", v, W_V, b_V, _W_V, _b_V)):
            weights, biases = (stacked, bias) if ref.shape[2] == n_heads else (grouped, grouped_bias)
            for h in range(ref.shape[2]):
                assert torch.allclose(x @ weights[layer, h] + biases[layer, h], ref[:, :, h], atol=ATOL), (name, layer, h)
        # values are not rotated: the hooked value heads are the same projections
        hook_v = cache[f"blocks.{layer}.attn.hook_v"]
        for g in range(n_kv):
            assert torch.allclose(x @ _W_V[layer, g] + _b_V[layer, g], hook_v[:, :, g], atol=ATOL), (layer, g)
    # grouped-query attention: query head h reads key/value head h // (n_heads / n_kv), as TransformerLens' W_K
    group = n_heads // n_kv
    for h in range(n_heads):
        assert torch.equal(W_K[:, h], _W_K[:, h // group]) and torch.equal(b_V[:, h], _b_V[:, h // group])


def test_gpt2_normalized_input_through_the_weights_is_the_hooked_query_key_value(tiny_checkpoints, tokens):
    model = load(tiny_checkpoints, "gpt2")  # no rotary, no q/k norm: hook_q / hook_k are the projections
    names = ["blocks.*.attn.hook_q", "blocks.*.attn.hook_k", "blocks.*.attn.hook_v"] + [
        f"module:transformer.h.{layer}.ln_1" for layer in range(3)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for layer in range(3):
        x = cache[f"module:transformer.h.{layer}.ln_1"]
        for name, W, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
            expected = torch.einsum("bpm,hmd->bphd", x, W[layer]) + b[layer]
            assert torch.allclose(expected, cache[f"blocks.{layer}.attn.hook_{name}"], atol=ATOL), (layer, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_weights_turn_hook_z_into_the_attention_output(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    n_layers = model.config.num_hidden_layers
    with recorded({layer: block_module(model, layer, "o_proj") for layer in range(n_layers)}) as seen:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_z", "hook_attn_out")))
    W_O, b_O = model.W_O, model.b_O
    assert W_O.shape == (n_layers, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
    assert b_O.shape == (n_layers, model.cfg.d_model)
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        out = torch.einsum("bphd,hdm->bpm", z, W_O[layer]) + b_O[layer]
        assert torch.allclose(out, seen[layer][1], atol=ATOL), layer
        if model.architecture.block_at(layer).ln1_post is None:  # else hook_attn_out is after a norm
            assert torch.allclose(out, cache[f"blocks.{layer}.hook_attn_out"], atol=ATOL), layer


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_mlp_weights_give_hook_pre_and_turn_hook_post_into_the_mlp_output(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    n_layers = model.config.num_hidden_layers
    modules = {("mlp", layer): block_module(model, layer, "mlp") for layer in range(n_layers)}
    modules |= {("out", layer): block_module(model, layer, "mlp_out") for layer in range(n_layers)}
    with recorded(modules) as seen:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: ".mlp.hook_" in n or n.endswith("hook_mlp_out"))
    W_in, b_in, W_gate, W_out, b_out = model.W_in, model.b_in, model.W_gate, model.W_out, model.b_out
    d_model, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    assert (W_in.shape, b_in.shape, W_out.shape, b_out.shape) == (
        (n_layers, d_model, d_mlp), (n_layers, d_mlp), (n_layers, d_mlp, d_model), (n_layers, d_model))
    gated = model.architecture.block.gated
    assert (W_gate is None) == (not gated) and model.cfg.gated_mlp == gated
    for layer in range(n_layers):
        p = f"blocks.{layer}."
        x = seen[("mlp", layer)][0]  # what the MLP reads
        linear = cache[p + ("mlp.hook_pre_linear" if gated else "mlp.hook_pre")]
        assert torch.allclose(x @ W_in[layer] + b_in[layer], linear, atol=ATOL), layer
        if gated:  # no family here has a gate bias
            assert torch.allclose(x @ W_gate[layer], cache[p + "mlp.hook_pre"], atol=ATOL), layer
        out = cache[p + "mlp.hook_post"] @ W_out[layer] + b_out[layer]
        assert torch.allclose(out, seen[("out", layer)][1], atol=ATOL), layer
        if model.architecture.block_at(layer).ln2_post is None:
            assert torch.allclose(out, cache[p + "hook_mlp_out"], atol=ATOL), layer


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_models_refuse_per_layer_mlp_weights(tiny_checkpoints, family):
    model = load(tiny_checkpoints, family)
    for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
        with pytest.raises(WeightViewError, match=f"{model.config.model_type} is a mixture-of-experts model .*layers"):
            getattr(model, name)
    if family == "deepseek_v3":
        with pytest.raises(WeightViewError, match="deepseek_v3 attention projects no per-head queries"):
            _ = model.W_Q


def hf_logit_transform(model, logits):
    """What the family's HF forward does to lm_head's output, from its config."""
    config = model.config
    if config.model_type == "cohere":
        return logits * config.logit_scale
    if config.model_type == "granite":
        return logits / config.logits_scaling
    if config.model_type in ("gemma2", "gemma3_text") and model.model.config.model_type != "gemma3":  # (multimodal: no cap)
        cap = config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_unembedding_turns_the_final_norms_output_into_the_logits(tiny_checkpoints, family, tokens):
    model = load(tiny_checkpoints, family)
    with recorded({"norm": model.model.get_submodule(model.architecture.final_norm)}) as seen:
        logits = model(tokens)
    assert model.W_U.shape == (model.cfg.d_model, VOCAB) and model.b_U.shape == (VOCAB,)
    assert torch.allclose(hf_logit_transform(model, seen["norm"][1] @ model.W_U + model.b_U), logits, atol=ATOL)
    assert bool(model.b_U.any()) == (family in ("gptj", "phi"))  # the families whose lm_head has a bias


def test_weight_views_are_detached_and_cannot_be_assigned(tiny_checkpoints):
    model = load(tiny_checkpoints, "llama_gqa")
    assert not any(getattr(model, name).requires_grad for name in ("W_E", "W_Q", "W_K", "W_O", "W_in", "W_U"))
    with pytest.raises(AttributeError):
        model.W_Q = torch.zeros(1)


# ------------------------------------------------------------- TransformerLens' own code


@pytest.fixture
def tl_patching():
    return pytest.importorskip("transformer_lens.patching")


def patching_inputs():
    generator = torch.Generator().manual_seed(3)
    clean = torch.randint(3, VOCAB, (2, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(3, VOCAB, (2,), generator=generator)
    return clean, corrupt, sl.metrics.logit_diff([5, 9], [11, 20])


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_transformer_lens_resid_pre_patching_equals_the_sweep(tiny_checkpoints, family, tl_patching):
    model = load(tiny_checkpoints, family)
    clean, corrupt, metric = patching_inputs()
    _, clean_cache = model.run_with_cache(clean)
    theirs = tl_patching.get_act_patch_resid_pre(model, corrupt, clean_cache, lambda logits: metric(logits))
    ours = sl.patching.sweep(model, clean, corrupt, points="resid_pre", metric=metric, over=("layer", "pos")).grid
    assert theirs.shape == ours.shape == (3, 6)
    assert torch.allclose(theirs, ours, atol=ATOL)
    assert theirs.abs().max() > 0.1  # the patches change the metric


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_transformer_lens_head_patching_equals_the_sweep(tiny_checkpoints, family, tl_patching):
    model = load(tiny_checkpoints, family)
    clean, corrupt, metric = patching_inputs()
    _, clean_cache = model.run_with_cache(clean)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupt, clean_cache, lambda logits: metric(logits))
    ours = sl.patching.sweep(model, clean, corrupt, points="z", metric=metric, over=("layer", "head")).grid
    assert theirs.shape == ours.shape == (3, 4)
    assert torch.allclose(theirs, ours, atol=ATOL)
    # value heads: TransformerLens sweeps cfg.n_key_value_heads of them
    theirs = tl_patching.get_act_patch_attn_head_v_all_pos(model, corrupt, clean_cache, lambda logits: metric(logits))
    ours = sl.patching.sweep(model, clean, corrupt, points="v", metric=metric, over=("layer", "head")).grid
    assert theirs.shape == ours.shape == (3, model.cfg.n_key_value_heads)
    assert torch.allclose(theirs, ours, atol=ATOL)
