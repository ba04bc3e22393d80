"""Splice: a dictionary in the model changes nothing unless asked, its points see what the
dictionary computes, ops on latents act through the decoder, and each error mode gives the
values and gradients it promises. References: the unspliced model, the dictionary's maths
written out with its weights, and plain autograd."""

import pytest
import torch

import shardlens as sl
from shardlens.hooks.dictionaries import Dictionary
from tests.hooks.reference import grad_through_leaf

ops = sl.ops
POINT = "blocks.1.hook_resid_mid"
LATENTS, RECONSTRUCTION, ERROR = (f"{POINT}.sae.{n}" for n in ("hook_latents", "hook_reconstruction", "hook_error"))
READ, WRITE = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
D_SAE = 40


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(0))


def weights(d_in=32, d_out=32, seed=0, skip=False) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d_in, D_SAE, generator=g) * 0.3, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "W_dec": torch.randn(D_SAE, d_out, generator=g) * 0.3, "b_dec": torch.randn(d_out, generator=g) * 0.1}
    if skip:
        tensors["W_skip"] = torch.randn(d_out, d_in, generator=g) * 0.1
    return tensors


SAE = Dictionary(weights())


def encode(x, w=None):
    w = w or SAE.weights
    return torch.relu(x @ w["W_enc"] + w["b_enc"])


def decode(z, w=None):
    w = w or SAE.weights
    return z @ w["W_dec"] + w["b_dec"]


def cache_of(model, tokens, names, hooks=()):
    return model.run_with_cache(tokens, names_filter=names, fwd_hooks=list(hooks))


def test_an_unedited_splice_leaves_logits_exactly_as_they_were(gpt2, tokens):
    clean_logits, clean = cache_of(gpt2, tokens, POINT)
    for names in (None, [LATENTS, RECONSTRUCTION, ERROR, POINT]):  # with and without hooks on its points
        with gpt2.hooks(fwd_hooks=[sl.HookSpec(POINT, ops.Splice(SAE))]):
            logits = gpt2(tokens) if names is None else cache_of(gpt2, tokens, names)[0]
        assert torch.equal(logits, clean_logits)
    _, cache = cache_of(gpt2, tokens, [LATENTS, RECONSTRUCTION, ERROR, POINT], [sl.HookSpec(POINT, ops.Splice(SAE))])
    x = clean[POINT]
    torch.testing.assert_close(cache[LATENTS], encode(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[RECONSTRUCTION], decode(encode(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[ERROR], x - decode(encode(x)), rtol=0, atol=1e-6)
    assert torch.equal(cache[POINT], x)


def test_dropping_the_error_leaves_the_reconstruction(gpt2, tokens):
    clean_logits, clean = cache_of(gpt2, tokens, POINT)
    logits, cache = cache_of(gpt2, tokens, [POINT, ERROR], [sl.HookSpec(POINT, ops.Splice(SAE, error="drop"))])
    x = clean[POINT]
    torch.testing.assert_close(cache[POINT], decode(encode(x)), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[ERROR], x - decode(encode(x)), rtol=0, atol=1e-6)
    assert (logits - clean_logits).abs().max() > 1e-2


@pytest.mark.parametrize("error", ["add", "freeze", "drop"])
@pytest.mark.parametrize("edit, expected", [
    (ops.Ablate("zero", features=[3, 17]), lambda z: z.index_fill(-1, torch.tensor([3, 17]), 0.0)),
    (ops.Patch(2.5, features=[5]), lambda z: z.index_fill(-1, torch.tensor([5]), 2.5)),  # clamp
    (ops.Add(torch.tensor([1.0, -0.5]), features=[0, 9], positions=[2]),
     lambda z: z + torch.zeros_like(z).index_put_((torch.arange(3)[:, None], torch.tensor([2]), torch.tensor([0, 9])), torch.tensor([1.0, -0.5]))),
    (ops.Scale(3.0, features=[1]), lambda z: z * torch.ones(D_SAE).index_fill(0, torch.tensor([1]), 3.0)),
])
def test_ops_on_latents_act_through_the_decoder(gpt2, tokens, edit, expected, error):
    _, clean = cache_of(gpt2, tokens, POINT)
    x = clean[POINT]
    _, cache = cache_of(gpt2, tokens, POINT, [sl.HookSpec(POINT, ops.Splice(SAE, error=error)), sl.HookSpec(LATENTS, edit)])
    edited = decode(expected(encode(x)))
    want = edited if error == "drop" else edited + (x - decode(encode(x)))
    torch.testing.assert_close(cache[POINT], want, rtol=0, atol=1e-5)


def test_a_hook_function_that_edits_latents_in_place_edits_the_output(gpt2, tokens):
    def zero_in_place(z, hook):
        z[..., 3] = 0.0  # TransformerLens style: changed in place, nothing returned

    _, clean = cache_of(gpt2, tokens, POINT)
    _, cache = cache_of(gpt2, tokens, POINT, [sl.HookSpec(POINT, ops.Splice(SAE)), (LATENTS, zero_in_place)])
    x = clean[POINT]
    want = decode(encode(x).index_fill(-1, torch.tensor([3]), 0.0)) + x - decode(encode(x))
    assert (encode(x)[..., 3] > 0).any()
    torch.testing.assert_close(cache[POINT], want, rtol=0, atol=1e-5)


def test_latents_patched_from_another_run(gpt2, tokens):
    other = torch.randint(3, 97, tokens.shape, generator=torch.Generator().manual_seed(5))
    splice = sl.HookSpec(POINT, ops.Splice(SAE))
    _, source = cache_of(gpt2, other, [LATENTS, POINT], [splice])
    _, clean = cache_of(gpt2, tokens, POINT)
    x = clean[POINT]
    _, cache = gpt2.run_with_cache(tokens, names_filter=POINT, fwd_hooks=[splice, sl.HookSpec(LATENTS, ops.Patch(from_cache="other", features=[2, 4]))],
                                   sources={"other": source})
    z = encode(x)
    z[..., [2, 4]] = source[LATENTS][..., [2, 4]]
    torch.testing.assert_close(cache[POINT], decode(z) + x - decode(encode(x)), rtol=0, atol=1e-5)


def _loss(model, tokens):
    return lambda: model(tokens, return_type="loss")


@pytest.mark.parametrize("error", ["add", "freeze"])
def test_gradients_below_and_at_the_latents_follow_the_error_mode(gpt2, tokens, error):
    below = "blocks.1.hook_resid_pre"
    splice = sl.HookSpec(POINT, ops.Splice(SAE, error=error))
    if error == "add":  # the identity: the unspliced model's gradient
        _, expected = grad_through_leaf(gpt2, below, _loss(gpt2, tokens))
    else:  # only through the dictionary: x -> decode(encode(x)) + constant error
        def frozen(x, hook):
            return decode(encode(x)) + (x - decode(encode(x))).detach()
        _, expected = grad_through_leaf(gpt2, below, _loss(gpt2, tokens), fwd_hooks=[(POINT, frozen)])
    _, got = grad_through_leaf(gpt2, below, _loss(gpt2, tokens), fwd_hooks=[splice])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # at the latents: the gradient at the point, through the decoder
    _, at_point = grad_through_leaf(gpt2, POINT, _loss(gpt2, tokens))
    _, cache = gpt2.run_with_cache(tokens, return_type="loss", names_filter=LATENTS, incl_bwd=True, fwd_hooks=[splice])
    torch.testing.assert_close(cache[LATENTS + "_grad"], at_point @ SAE.weights["W_dec"].T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("error", ["add", "freeze"])
def test_the_error_point_and_a_hook_functions_tensor_hook_get_their_gradients(gpt2, tokens, error):
    _, at_point = grad_through_leaf(gpt2, POINT, _loss(gpt2, tokens))
    seen = {}

    def watch(z, hook):  # TransformerLens style: a tensor hook registered in a forward hook
        z.register_hook(lambda grad: seen.setdefault("latents", grad))

    splice = sl.HookSpec(POINT, ops.Splice(SAE, error=error))
    _, cache = gpt2.run_with_cache(tokens, return_type="loss", names_filter=ERROR, incl_bwd=True, fwd_hooks=[splice, (LATENTS, watch)])
    torch.testing.assert_close(cache[ERROR + "_grad"], at_point, rtol=0, atol=1e-5)  # the error adds to the output
    torch.testing.assert_close(seen["latents"], at_point @ SAE.weights["W_dec"].T, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- transcoders

TRANSCODER = Dictionary(weights(seed=3, skip=True))
T_LATENTS, T_RECONSTRUCTION, T_ERROR = (f"{WRITE}.sae.{n}" for n in ("hook_latents", "hook_reconstruction", "hook_error"))


def transcode(x):
    w = TRANSCODER.weights
    return decode(encode(x, w), w) + x @ w["W_skip"].T


def test_a_transcoder_reads_one_point_and_replaces_another(gpt2, tokens):
    clean_logits, clean = cache_of(gpt2, tokens, [READ, WRITE])
    spec = sl.HookSpec([READ, WRITE], ops.Splice(TRANSCODER, write=WRITE))
    assert spec.created_names([READ, WRITE]) == [T_LATENTS, T_RECONSTRUCTION, T_ERROR]
    logits, cache = cache_of(gpt2, tokens, [WRITE, T_LATENTS, T_RECONSTRUCTION, T_ERROR], [spec])
    assert torch.equal(logits, clean_logits)
    x, y = clean[READ], clean[WRITE]
    torch.testing.assert_close(cache[T_LATENTS], encode(x, TRANSCODER.weights), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[T_RECONSTRUCTION], transcode(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(cache[T_ERROR], y - transcode(x), rtol=0, atol=1e-5)
    dropped = sl.HookSpec([READ, WRITE], ops.Splice(TRANSCODER, write=WRITE, error="drop"))
    _, cache = cache_of(gpt2, tokens, [READ, WRITE], [dropped])
    torch.testing.assert_close(cache[READ], x, rtol=0, atol=0)  # the input point is read, not changed
    torch.testing.assert_close(cache[WRITE], transcode(x), rtol=0, atol=1e-5)


def test_a_transcoder_reading_another_layer_is_refused_before_it_runs(gpt2):
    spec = sl.HookSpec(["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], ops.Splice(TRANSCODER, write="blocks.1.hook_mlp_out"))
    with pytest.raises(ValueError, match="reads blocks.0.hook_resid_post: a transcoder reads and writes in one layer .* layers 0 and 1"):
        with gpt2.hooks(fwd_hooks=[spec]):
            pass
    assert not gpt2.list_hooks()


def test_a_transcoder_whose_input_point_is_missing_says_so(gpt2, tokens):
    with pytest.raises(ValueError, match="before its input point: its spec must name the point it reads"):
        gpt2.run_with_hooks(tokens, fwd_hooks=[sl.HookSpec(WRITE, ops.Splice(TRANSCODER, write=WRITE))])
