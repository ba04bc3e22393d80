"""HookedModel on a tiny random checkpoint of every supported family (tests/tiny_models.py).

References are the same checkpoints loaded as plain transformers models, their
output_hidden_states, torch autograd, and explicit recomputation from weights.
"""

import pytest
import torch

import shardlens as sl
from shardlens.hooks import HookNameError
from tests.hooks.reference import grad_through_leaf
from tests.tiny_models import FAMILIES, load_reference

ATOL = 1e-5


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def checkpoint(tiny_checkpoints, family):
    return tiny_checkpoints[family]


@pytest.fixture
def model(checkpoint):
    return sl.HookedModel.from_pretrained(checkpoint)


@pytest.fixture
def reference(checkpoint):
    return load_reference(checkpoint)


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def heads(model):
    """(query heads, key/value heads, d_head of v and z), as the HF attention module and
    config give them."""
    config, attention = model.config, hf_module(model, 0, "attn")
    n_heads = config.num_attention_heads
    if hasattr(attention, "num_kv_heads"):  # Falcon (1 in multi-query Falcons)
        n_kv = attention.num_kv_heads
    else:
        n_kv = n_heads // getattr(attention, "num_key_value_groups", 1)
    d_head = getattr(config, "v_head_dim", None) or getattr(attention, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, d_head


def hf_block(model, layer):
    return model.model.get_submodule(model.architecture.blocks)[layer]


def hf_module(model, layer, name):
    """The wrapped model's module at the block architecture's field `name` of `layer`."""
    return hf_block(model, layer).get_submodule(getattr(model.architecture.block_at(layer), name))


def attention_kind(model, layer):
    return model.architecture.attention_kind(layer)


# ---------------------------------------------------------------- whole-model equality


def test_logits_caching_every_point_equal_the_unwrapped_model(model, reference, tokens):
    with torch.no_grad():
        expected = reference(tokens).logits
    logits, cache = model.run_with_cache(tokens)
    assert len(cache) == len(model.hook_names()) > 30
    assert torch.allclose(logits, expected, atol=ATOL)
    assert torch.allclose(cache["hook_logits"], expected, atol=ATOL)
    for name in cache:  # the shapes the model declares (Arrow, specs' checks) are the ones it produces
        if model.hook_shape(name) is not None:
            assert cache[name].shape[2:] == model.hook_shape(name), name


def test_without_hooks_the_forward_is_the_plain_one(model, reference, tokens):
    with torch.no_grad():
        expected = reference(tokens).logits
        assert torch.equal(model(tokens), expected)  # bitwise: SDPA path, no recomputation
        _, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
        assert torch.equal(model(tokens), expected)  # and the taps are unwired again


def test_residual_stream_equals_hidden_states(model, reference, tokens):
    with torch.no_grad():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"])
    n_layers = model.config.num_hidden_layers
    for layer in range(n_layers):
        assert torch.allclose(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=ATOL), layer
    for layer in range(n_layers - 1):
        assert torch.allclose(cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], atol=ATOL), layer
    # transformers' last hidden state is after the final norm
    final_norm = reference.get_submodule(model.architecture.final_norm)
    with torch.no_grad():
        assert torch.allclose(final_norm(cache[f"blocks.{n_layers - 1}.hook_resid_post"]), hidden[n_layers], atol=ATOL)


def test_loss_equals_transformers_loss(model, reference, tokens):
    with torch.no_grad():
        expected = reference(tokens, labels=tokens).loss
    assert torch.allclose(model(tokens, return_type="loss"), expected, atol=ATOL)
    logits, loss = model(tokens, return_type="both")
    assert torch.allclose(loss, expected, atol=ATOL) and logits.shape == (2, 9, 97)
    assert model(tokens, return_type=None) is None


# ---------------------------------------------------------------- attention internals


def test_attention_shapes_and_gqa(model, tokens):
    n_heads, n_kv_heads, d_head = heads(model)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.*")
    assert cache["blocks.0.attn.hook_q"].shape[:3] == (2, 9, n_heads)  # (DeepSeek's q and k are wider than v)
    assert cache["blocks.0.attn.hook_k"].shape[:3] == (2, 9, n_kv_heads)
    assert cache["blocks.0.attn.hook_v"].shape == (2, 9, n_kv_heads, d_head)
    assert cache["blocks.0.attn.hook_attn_scores"].shape == (2, n_heads, 9, 9)
    assert cache["blocks.0.attn.hook_z"].shape == (2, 9, n_heads, d_head)


def test_pattern_rows_sum_to_one_and_are_causal(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter="blocks.*.attn.hook_pattern")
    for name, pattern in cache.items():
        sums = pattern.sum(-1)
        if model.config.model_type == "gpt_oss":  # attention sinks take a share of each row
            assert (sums < 1).all() and (sums > 0).all(), name
        else:
            assert torch.allclose(sums, torch.ones(pattern.shape[:-1]), atol=1e-6), name
        seen = torch.tril(torch.ones(9, 9, dtype=torch.bool))
        if attention_kind(model, int(name.split(".")[1])) == "sliding_attention":
            seen &= ~torch.tril(torch.ones(9, 9, dtype=torch.bool), diagonal=-model.config.sliding_window)
        assert torch.count_nonzero(pattern[..., ~seen]) == 0, name
        assert (pattern[..., seen] > 0).all(), name


def test_z_recomputed_from_pattern_and_v(model, tokens):
    n_heads, n_kv_heads, _ = heads(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn."))
    pattern, v = cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_v"]
    for head in range(n_heads):
        kv_head = head // (n_heads // n_kv_heads)
        z = pattern[:, head] @ v[:, :, kv_head]  # [batch, q_pos, d_head]
        assert torch.allclose(cache["blocks.1.attn.hook_z"][:, :, head], z, atol=1e-6), head


def test_scores_are_scaled_dot_products_of_q_and_k(model, tokens):
    n_heads, n_kv_heads, d_head = heads(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.attn."))
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    scores = cache["blocks.0.attn.hook_attn_scores"]
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    if attention_kind(model, 0) == "sliding_attention":
        causal &= ~torch.tril(torch.ones(9, 9, dtype=torch.bool), diagonal=-model.config.sliding_window)
    attention = hf_module(model, 0, "attn")
    scaling = getattr(attention, "scaling", getattr(attention, "inv_norm_factor", q.shape[-1] ** -0.5))
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    for head in range(n_heads):
        expected = q[:, :, head] @ k[:, :, head // (n_heads // n_kv_heads)].transpose(1, 2) * scaling
        if softcap is not None:  # Gemma 2: scores are after the soft-cap
            expected = torch.tanh(expected / softcap) * softcap
        assert torch.allclose(scores[:, head][:, causal], expected[:, causal], atol=1e-5), head


def test_q_and_k_are_after_rotary(tiny_checkpoints, tokens):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"])
    hf = load_reference(tiny_checkpoints["llama_gqa"])
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k"])
    with torch.no_grad():
        layer = hf.model.layers[0]
        x = layer.input_layernorm(cache["blocks.0.hook_resid_pre"])
        q = layer.self_attn.q_proj(x).view(2, 9, -1, 8).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(2, 9, -1, 8).transpose(1, 2)
        cos, sin = hf.model.rotary_emb(x, torch.arange(9)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(cache["blocks.0.attn.hook_q"], q.transpose(1, 2), atol=1e-6)
    assert torch.allclose(cache["blocks.0.attn.hook_k"], k.transpose(1, 2), atol=1e-6)


def test_zeroing_a_head_in_z_equals_zeroing_its_slice_of_the_output_projection_input(model, reference, tokens):
    _, _, d_head = heads(model)
    head = 2

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    o_proj = reference.get_submodule(model.architecture.blocks)[1].get_submodule(model.architecture.block_at(1).o_proj)

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_slice)
    with torch.no_grad():
        expected = reference(tokens).logits
    handle.remove()
    assert torch.allclose(logits, expected, atol=ATOL)
    assert not torch.allclose(logits, model(tokens), atol=1e-3)


def test_hook_result_is_each_heads_output_through_w_o(model, tokens):
    n_heads, _, d_head = heads(model)
    model.set_use_attn_result(True)
    assert "blocks.0.attn.hook_result" in model.hook_names()
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0."))
    o_proj = hf_module(model, 0, "o_proj")
    weight = o_proj.weight.T if isinstance(o_proj, torch.nn.Linear) else o_proj.weight  # [head * d_head, d_model]
    z, result = cache["blocks.0.attn.hook_z"], cache["blocks.0.attn.hook_result"]
    for head in range(n_heads):
        expected = z[:, :, head] @ weight[head * d_head:(head + 1) * d_head]
        assert torch.allclose(result[:, :, head], expected, atol=1e-5), head
    bias = 0 if o_proj.bias is None else o_proj.bias
    attn_out = cache["blocks.0.hook_attn_out"]
    if model.architecture.block.ln1_post is not None:  # Gemma 2, OLMo-2: attn_out is after the output norm
        _, before = model.run_with_cache(tokens, names_filter=[f"module:{model.architecture.blocks}.0.{model.architecture.block.attn}"])
        attn_out = before[f"module:{model.architecture.blocks}.0.{model.architecture.block.attn}"]
    assert torch.allclose(result.sum(2) + bias, attn_out, atol=1e-5)
    model.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" not in model.hook_names()


# ---------------------------------------------------------------- norms, MLP, residual


def norm_inputs(model, cache, layer):
    """(norm name, the tensor that norm reads) for each norm of a block."""
    block = model.architecture.block_at(layer)
    p = f"blocks.{layer}."
    reads = {
        "ln1": cache[p + "hook_resid_pre"],
        "ln2": cache[p + "hook_resid_pre"] if block.parallel else cache.get(p + "hook_resid_mid"),
        "ln1_post": cache.get(f"module:{model.architecture.blocks}.{layer}.{block.attn}"),
        "ln2_post": cache.get(f"module:{model.architecture.blocks}.{layer}.{block.mlp}"),
    }
    return [(name, reads[name]) for name in reads if getattr(block, name) is not None]


def test_norm_scale_and_normalized(model, tokens):
    block = model.architecture.block_at(1)
    modules = [f"module:{model.architecture.blocks}.1.{getattr(block, f)}" for f in ("attn", "mlp")]
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_*", "blocks.1.ln*", *modules])
    checked = 0
    for name, x in norm_inputs(model, cache, 1):
        x = x.float()
        module = hf_module(model, 1, name)
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))  # OLMo's LayerNorm fixes 1e-5
        if block.norm.startswith("layernorm"):
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        assert torch.allclose(cache[f"blocks.1.{name}.hook_scale"], scale, atol=1e-6), name
        assert torch.allclose(cache[f"blocks.1.{name}.hook_normalized"], x / scale, atol=1e-5), name
        checked += 1
    assert checked >= 1


def mlp_activation(model, layer):
    mlp = hf_module(model, layer, "mlp")
    return next(getattr(mlp, name) for name in ("act_fn", "activation_fn", "act") if hasattr(mlp, name))


@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_post_is_what_the_output_projection_reads(model, tokens, layer):
    block = model.architecture.block_at(layer)
    if block.moe is not None:
        assert f"blocks.{layer}.mlp.hook_post" not in model.hook_names()
        return
    mlp_module = f"module:{model.architecture.blocks}.{layer}.{block.mlp}"
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.mlp.*", mlp_module])
    down = hf_module(model, layer, "mlp_out")
    with torch.no_grad():
        assert torch.allclose(down(cache[f"blocks.{layer}.mlp.hook_post"]), cache[mlp_module], atol=1e-5)
        expected = mlp_activation(model, layer)(cache[f"blocks.{layer}.mlp.hook_pre"])
    if block.gated:
        expected = expected * cache[f"blocks.{layer}.mlp.hook_pre_linear"]
    assert torch.allclose(cache[f"blocks.{layer}.mlp.hook_post"], expected, atol=1e-5)


def test_resid_mid_patch_reaches_both_readers(model, tokens):
    block = model.architecture.block_at(1)
    if block.parallel:
        assert "blocks.0.hook_resid_mid" not in model.hook_names()
        return
    patch = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: patch)]):
        logits, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_mid"], patch)
    # the residual addition after the MLP read the patched value too
    multiplier = getattr(model.config, "residual_multiplier", 1.0)  # Granite scales what each block adds
    assert torch.allclose(cache["blocks.1.hook_resid_post"], patch + multiplier * cache["blocks.1.hook_mlp_out"], atol=1e-6)
    with torch.no_grad():
        mlp_in = patch if block.ln2 is None else hf_module(model, 1, "ln2")(patch)
        mlp_out = hf_module(model, 1, "mlp")(mlp_in)
        mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
        if block.ln2_post is not None:
            mlp_out = hf_module(model, 1, "ln2_post")(mlp_out)
    assert torch.allclose(cache["blocks.1.hook_mlp_out"], mlp_out, atol=1e-6)


def test_gradients_equal_autograd(model, tokens):
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.attn.hook_pattern", "blocks.2.hook_resid_post"]
    if not model.architecture.block_at(1).parallel:
        names.append("blocks.1.hook_resid_mid")
    _, cache = model.run_with_cache(tokens, return_type="loss", names_filter=names, incl_bwd=True)
    for name in names:
        _, expected = grad_through_leaf(model, name, lambda: model(tokens, return_type="loss"))
        assert torch.allclose(cache[name + "_grad"], expected, atol=1e-6), name


# ---------------------------------------------------------------- padding and inputs


def test_left_padded_batch_equals_each_example_alone(model):
    short = torch.randint(3, 97, (5,), generator=torch.Generator().manual_seed(5))
    full = torch.randint(3, 97, (8,), generator=torch.Generator().manual_seed(6))
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = short, 1
    batch[1], mask[1] = full, 1
    names = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern", "blocks.*.attn.hook_q", "hook_logits"]
    _, padded = model.run_with_cache(batch, attention_mask=mask, names_filter=names)
    _, alone_short = model.run_with_cache(short, names_filter=names)
    _, alone_full = model.run_with_cache(full, names_filter=names)
    for name in padded:
        if name.endswith("hook_pattern"):
            assert torch.allclose(padded[name][0, :, 3:, 3:], alone_short[name][0], atol=ATOL), name
            assert torch.count_nonzero(padded[name][0, :, 3:, :3]) == 0, name  # padding gets no attention
        else:
            assert torch.allclose(padded[name][0, 3:], alone_short[name][0], atol=ATOL), name
        assert torch.allclose(padded[name][1], alone_full[name][0], atol=ATOL), name
    assert torch.allclose(model(batch, attention_mask=mask)[0, 3:], model(short)[0], atol=ATOL)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gpt_neox"])
def test_text_input_with_a_tokenizer(tiny_checkpoints, name):
    # (Not qwen2: AutoTokenizer maps that model type to Qwen2Tokenizer, which rebuilds a
    # byte-level BPE around the tiny word-level vocabulary.)
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    tokens = model.to_tokens(["w1 w2 w3", "w4"])
    assert tokens.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert model.to_string(tokens[0]) == "w1 w2 w3"
    assert model.to_string(torch.tensor([[4, 5]])) == ["w1 w2"]
    by_text = model("w1 w2 w3")
    assert torch.equal(by_text, model(torch.tensor([[4, 5, 6]])))
    loss = model(["w1 w2 w3", "w4 w5"], return_type="loss")
    expected = (model(torch.tensor([[4, 5, 6]]), return_type="loss") * 2 + model(torch.tensor([[7, 8]]), return_type="loss")) / 3
    assert torch.allclose(loss, expected, atol=ATOL)  # the mean over real next-token predictions


def test_bad_inputs_are_refused(tiny_checkpoints, model, tokens):
    with pytest.raises(TypeError, match="integer tensor"):
        model(tokens.float())
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="logit")
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(tokens[None])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=torch.ones(2, 3))
    bare = sl.HookedModel(load_reference(tiny_checkpoints["gpt2"]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare("w1 w2")


# ---------------------------------------------------------------- module points and fallback


def test_module_points_on_request(model, tokens):
    mlp_path = f"{model.architecture.blocks}.0.{model.architecture.block.ln2_post or model.architecture.block.mlp}"
    _, cache = model.run_with_cache(tokens, names_filter=[f"module:{mlp_path}", "blocks.0.hook_mlp_out"])
    assert torch.equal(cache[f"module:{mlp_path}"], cache["blocks.0.hook_mlp_out"])
    assert f"module:{mlp_path}" in model.hook_names()
    with pytest.raises(HookNameError, match=f"module:{mlp_path}"):
        model.add_hook(f"module:{mlp_path}x", lambda x, hook: None)


def test_generic_fallback_hooks_any_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 2)))
    hooked = sl.HookedModel(net)
    assert hooked.hook_names() == ["module:0", "module:1", "module:2", "module:2.0"]
    x = torch.randn(3, 4)
    out, cache = hooked.run_with_cache(x)
    assert torch.equal(out, net(x))
    assert torch.equal(cache["module:1"], torch.relu(net[0](x)))
    patched = hooked.run_with_hooks(x, fwd_hooks=[("module:1", lambda h, hook: torch.zeros_like(h))])
    assert torch.equal(patched, net[2](torch.zeros(3, 8)))


def test_the_fallback_caches_every_module_of_an_unregistered_causal_lm():
    import transformers

    config = transformers.AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=97)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hooked = sl.HookedModel(hf)
    assert hooked.architecture is None and "module:transformer.h.1.self_attention" in hooked.hook_names()
    tokens = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True)
    loss, cache = hooked.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert torch.allclose(loss, hf(tokens, labels=tokens).loss, atol=1e-6)
    assert len([n for n in cache if not n.endswith("_grad")]) >= len(hooked.hook_names()) - 1  # all but modules that never run
    # a module returning a ModelOutput caches its first tensor field, one returning a tuple its first tensor
    assert torch.equal(cache["module:transformer"], expected.hidden_states[-1])
    assert torch.equal(cache["module:transformer.h.0"], expected.hidden_states[1])
    assert torch.equal(hooked(tokens), expected.logits)


def test_the_fallback_taps_the_tensor_part_of_dict_and_tuple_outputs():
    from collections import namedtuple

    Pair = namedtuple("Pair", "meta value")

    class DictOut(torch.nn.Linear):
        def forward(self, x):
            return {"note": "no tensor", "value": super().forward(x)}

    class TupleOut(torch.nn.Linear):
        def forward(self, x):
            return Pair(None, super().forward(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d, self.t = DictOut(3, 3), TupleOut(3, 3)

        def forward(self, x):
            return self.t(self.d(x)["value"]).value.sum(-1)

    torch.manual_seed(0)
    net = Net()
    hooked = sl.HookedModel(net)
    x = torch.randn(2, 3)
    out, cache = hooked.run_with_cache(x)
    assert torch.equal(out, net(x))
    assert torch.equal(cache["module:d"], net.d(x)["value"])
    assert torch.equal(cache["module:t"], net.t(net.d(x)["value"]).value)
    patched = hooked.run_with_hooks(x, fwd_hooks=[("module:d", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(patched, net.t(torch.zeros(2, 3)).value.sum(-1))
    patched = hooked.run_with_hooks(x, fwd_hooks=[("module:t", lambda t, hook: torch.ones_like(t))])
    assert torch.equal(patched, torch.full((2,), 3.0))


def test_a_checkpoint_loads_in_the_dtype_its_config_names(tiny_checkpoints, tmp_path):
    load_reference(tiny_checkpoints["llama_gqa"]).to(torch.bfloat16).save_pretrained(tmp_path)
    assert sl.HookedModel.from_pretrained(tmp_path).model.dtype == torch.bfloat16  # as transformers' dtype="auto"
    assert sl.HookedModel.from_pretrained(tmp_path, dtype=torch.float32).model.dtype == torch.float32
    assert sl.HookedModel.from_pretrained(tiny_checkpoints["llama_gqa"]).model.dtype == torch.float32


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere"])
def test_hook_logits_is_after_the_familys_logit_transform(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    with torch.no_grad():
        expected = load_reference(tiny_checkpoints[name])(tokens).logits
    _, cache = model.run_with_cache(tokens, names_filter="hook_logits", labels=tokens)  # a loss first in the output
    assert torch.allclose(cache["hook_logits"], expected, atol=ATOL)
    seen = {}
    with model.base_run(tokens) as base, model.hooks(fwd_hooks=[("hook_logits", lambda x, hook: seen.setdefault("x", x))]):
        from_layer_1 = model.run(sl.RunRequest(tokens, resume=sl.hooks.Resume(base, 1, position=2))).output
    assert torch.allclose(from_layer_1, expected[:, 2:], atol=ATOL) and torch.equal(seen["x"], from_layer_1)


@pytest.mark.parametrize("name", ["falcon", "falcon_7b"])
def test_falcons_in_place_add_leaves_cached_mlp_outputs_alone(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    path = f"{model.architecture.blocks}.1.{model.architecture.block.mlp_out}"  # what the block adds the attention output into
    _, post = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    with torch.no_grad():
        expected = model.model.get_submodule(path)(post["blocks.1.mlp.hook_post"])
    mlp = f"module:{model.architecture.blocks}.1.{model.architecture.block.mlp}"
    for point in (f"module:{path}", mlp, "blocks.1.hook_mlp_out"):  # each cached alone
        _, cache = model.run_with_cache(tokens, names_filter=point)
        assert torch.allclose(cache[point], expected, atol=1e-6), point


@pytest.mark.parametrize("name", ["granite", "gemma2", "gpt2"])
def test_the_residual_decomposition_sums_to_the_residual_stream(tiny_checkpoints, tokens, name):
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[name])
    _, cache = model.run_with_cache(tokens)
    parts = cache.decompose_resid(layer=2)
    assert torch.allclose(parts.sum(0), cache["blocks.2.hook_resid_pre"], atol=1e-5)
