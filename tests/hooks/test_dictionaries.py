"""Published dictionaries load as published and compute what SAELens computes: each
architecture's random weights are saved by SAELens' own code, loaded here, and compared with
SAELens' encode / decode / forward (fp32, 1e-5)."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import shardlens as sl
from shardlens.hooks.dictionaries import Dictionary, WeightsRef
from shardlens.hooks.dictionaries._dictionary import forget_loaded_weights

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D_IN, D_SAE = 16, 48
POINT = "blocks.1.hook_resid_post"


def _randomize(sae, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * (0.3 if parameter.ndim > 1 else 0.1)
            parameter.copy_(values.abs() * 0.5 if name == "threshold" else values)


def _saelens_sae(kind: str, seed: int = 0, **options):
    configs = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig), "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig), "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
    }
    cls, config_cls = configs[kind]
    metadata = SAEMetadata(hook_name=options.pop("hook_name", POINT), sae_lens_version=sae_lens.__version__)
    options.setdefault("apply_b_dec_to_input", False)  # SAELens' default is True: each case says which it tests
    sae = cls(config_cls(d_in=options.pop("d_in", D_IN), d_sae=D_SAE, metadata=metadata, **options))
    _randomize(sae, seed)
    return sae


def _inputs(shape=(3, 5, D_IN), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


SAE_CASES = {
    "standard": ("standard", {}),
    "standard-b_dec-in": ("standard", {"apply_b_dec_to_input": True}),
    "standard-constant-norm": ("standard", {"normalize_activations": "constant_norm_rescale"}),
    "standard-layer-norm": ("standard", {"normalize_activations": "layer_norm", "apply_b_dec_to_input": True}),
    "standard-expected-average": ("standard", {"normalize_activations": "expected_average_only_in"}),
    "gated": ("gated", {"apply_b_dec_to_input": True}),
    "jumprelu": ("jumprelu", {}),
    "jumprelu-b_dec-in": ("jumprelu", {"apply_b_dec_to_input": True}),
    "topk": ("topk", {"k": 5}),
    "topk-most": ("topk", {"k": 40}),  # some of the 40 largest are negative: ReLU'd
    "topk-rescaled": ("topk", {"k": 7, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True}),
}


@pytest.mark.parametrize("case", SAE_CASES)
def test_saelens_folder_gives_saelens_encode_decode_and_forward(case, tmp_path):
    kind, options = SAE_CASES[case]
    sae = _saelens_sae(kind, **options)
    sae.save_model(tmp_path)
    spec = sl.dictionaries.load(tmp_path)
    assert spec.points == POINT  # from cfg.json's hook_name
    dictionary = spec.op.dictionary
    x = _inputs()
    with torch.no_grad():
        latents = dictionary.encode(x)
        expected_latents = sae.encode(x)
        assert (expected_latents != 0).any() and (expected_latents == 0).any()
        torch.testing.assert_close(latents, expected_latents, rtol=0, atol=1e-5)
        torch.testing.assert_close(dictionary.decode(latents, x), sae(x), rtol=0, atol=1e-5)


def test_a_cfg_json_without_apply_b_dec_to_input_takes_saelens_default(tmp_path):
    sae = _saelens_sae("standard", apply_b_dec_to_input=True)
    sae.save_model(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    del config["apply_b_dec_to_input"]
    config["dtype"] = "torch.float32"  # as older SAELens wrote it
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    reference, ours = sae_lens.SAE.load_from_disk(tmp_path), sl.dictionaries.read(tmp_path)
    assert reference.cfg.apply_b_dec_to_input and ours.apply_b_dec_to_input and ours.dtype == "float32"
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), reference.encode(x), rtol=0, atol=1e-5)


def test_batch_top_k_saved_for_inference_and_as_trained_give_saelens_values(tmp_path):
    config = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=SAEMetadata(hook_name=POINT))
    trained = sae_lens.BatchTopKTrainingSAE(config)
    _randomize(trained, 3)
    trained.topk_threshold = torch.tensor(0.4)
    trained.save_inference_model(tmp_path / "inference")  # what SAELens publishes: a JumpReLU
    trained.save_model(tmp_path / "training")  # architecture "batchtopk", with topk_threshold
    reference = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert json.loads((tmp_path / "training" / "cfg.json").read_text())["architecture"] == "batchtopk"
    x = _inputs()
    with torch.no_grad():
        expected_latents, expected = reference.encode(x), reference(x)
        assert (expected_latents != 0).any() and (expected_latents == 0).any()
        for folder in ("inference", "training"):
            dictionary = sl.dictionaries.read(tmp_path / folder)
            torch.testing.assert_close(dictionary.encode(x), expected_latents, rtol=0, atol=1e-5)
            torch.testing.assert_close(dictionary.decode(dictionary.encode(x), x), expected, rtol=0, atol=1e-5)


def test_a_pre_6_saelens_folder_loads_with_saelens_defaults(tmp_path):
    sae = _saelens_sae("topk", k=6, apply_b_dec_to_input=True)
    sae.save_model(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    old = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": POINT, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6},
           "normalize_activations": False, "dtype": config["dtype"], "device": "cpu"}  # SAELens 5: no apply_b_dec_to_input: True
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    reference = sae_lens.SAE.load_from_disk(tmp_path)
    spec = sl.dictionaries.load(tmp_path)
    assert spec.points == POINT and spec.op.dictionary.k == 6 and spec.op.dictionary.apply_b_dec_to_input
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(spec.op.dictionary.encode(x), reference.encode(x), rtol=0, atol=1e-5)


def test_hook_z_sae_reads_heads_flattened(tmp_path):
    sae = _saelens_sae("standard", d_in=4 * 4, hook_name="blocks.0.attn.hook_z", reshape_activations="hook_z")
    sae.save_model(tmp_path)
    dictionary = sl.dictionaries.read(tmp_path)
    x = _inputs((2, 3, 4, 4))  # [batch, pos, head, d_head]
    with torch.no_grad():
        torch.testing.assert_close(dictionary.encode(x), sae.encode(x), rtol=0, atol=1e-5)
        out = dictionary.decode(dictionary.encode(x), x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, sae(x), rtol=0, atol=1e-5)


TRANSCODERS = {
    "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
    "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
    "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
    "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
}


def _saelens_transcoder(kind: str, d_out: int = D_IN + 4, normalize: str = "none"):
    cls, config_cls = TRANSCODERS[kind]
    metadata = SAEMetadata(hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    config = config_cls(d_in=D_IN, d_sae=D_SAE, d_out=d_out, apply_b_dec_to_input=False, normalize_activations=normalize, metadata=metadata)
    transcoder = cls(config)
    _randomize(transcoder, 5)
    return transcoder


@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("kind", TRANSCODERS)
def test_saelens_transcoders_read_one_point_and_write_another(kind, normalize, tmp_path):
    transcoder = _saelens_transcoder(kind, normalize=normalize)
    transcoder.save_model(tmp_path)
    spec = sl.dictionaries.load(tmp_path)
    assert spec.points == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    assert spec.op.write == "blocks.0.hook_mlp_out"
    dictionary = spec.op.dictionary
    assert dictionary.has_skip == ("skip" in kind)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(dictionary.encode(x), transcoder.encode(x), rtol=0, atol=1e-5)
        out = dictionary.decode(dictionary.encode(x), x)
        assert out.shape == (3, 5, D_IN + 4)
        torch.testing.assert_close(out, transcoder(x), rtol=0, atol=1e-5)


def _state(sae) -> dict:
    return {name: value.detach().clone() for name, value in sae.state_dict().items()}


def test_gemma_scope_params_npz_is_a_jumprelu(tmp_path):
    sae = _saelens_sae("jumprelu", seed=7)
    folder = tmp_path / "layer_1" / "width_16k" / "average_l0_7"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{name: value.numpy() for name, value in _state(sae).items()})
    x = _inputs()
    with torch.no_grad():
        for path in (folder, folder / "params.npz"):
            spec = sl.dictionaries.load(path, point=POINT)
            assert spec.op.dictionary.architecture == "jumprelu"
            torch.testing.assert_close(spec.op.dictionary.encode(x), sae.encode(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(spec.op.dictionary.decode(sae.encode(x), x), sae(x), rtol=0, atol=1e-5)


def test_plain_safetensors_with_sae_lens_names(tmp_path):
    sae = _saelens_sae("standard", seed=8)
    save_file(_state(sae), tmp_path / "sae.safetensors")
    dictionary = sl.dictionaries.read(tmp_path / "sae.safetensors")
    assert dictionary.architecture == "standard"
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(dictionary.encode(x), sae.encode(x), rtol=0, atol=1e-5)
    transcoder = _saelens_transcoder("skip_transcoder", d_out=D_IN)
    save_file(_state(transcoder), tmp_path / "transcoder.safetensors")
    with pytest.raises(ValueError, match="transcoder .*pass write="):
        sl.dictionaries.load(tmp_path / "transcoder.safetensors", point="blocks.0.ln2.hook_normalized")
    spec = sl.dictionaries.load(tmp_path / "transcoder.safetensors", point="blocks.0.ln2.hook_normalized", write="blocks.0.hook_mlp_out")
    with torch.no_grad():
        torch.testing.assert_close(spec.op.dictionary.decode(spec.op.dictionary.encode(x), x), transcoder(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- by reference, not by value


def test_a_loaded_spec_names_its_weights_and_their_hash_and_travels_as_json(tmp_path):
    sae = _saelens_sae("jumprelu", seed=9)
    sae.save_model(tmp_path)
    spec = sl.dictionaries.load(tmp_path)
    ref = spec.op.dictionary.weights
    assert isinstance(ref, WeightsRef) and ref.uri == str(tmp_path / "sae_weights.safetensors")
    import hashlib

    assert ref.sha256 == hashlib.sha256((tmp_path / "sae_weights.safetensors").read_bytes()).hexdigest()
    text = spec.to_json()
    assert len(text) < 1000  # a reference, not the weights
    again = sl.HookSpec.from_json(text)
    assert again == spec
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again.op.dictionary.encode(x), sae.encode(x), rtol=0, atol=1e-5)


def test_a_given_hash_spares_reading_the_file_and_is_checked_where_it_is_used(tmp_path):
    sae = _saelens_sae("standard", seed=12)
    sae.save_model(tmp_path)
    import hashlib

    digest = hashlib.sha256((tmp_path / "sae_weights.safetensors").read_bytes()).hexdigest()
    from shardlens.hooks.dictionaries import _weights

    with mock.patch.object(_weights, "_open", side_effect=AssertionError("streamed the file")):
        spec = sl.dictionaries.load(tmp_path, sha256=digest)  # the header only
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(spec.op.dictionary.encode(x), sae.encode(x), rtol=0, atol=1e-5)
    wrong = sl.dictionaries.load(tmp_path, sha256="0" * 64)
    forget_loaded_weights()
    with pytest.raises(ValueError, match="has sha256 .* not the 0000"):
        wrong.op.dictionary.encode(x)


def test_a_changed_weights_file_is_refused_by_hash(tmp_path):
    _saelens_sae("standard", seed=10).save_model(tmp_path)
    spec = sl.dictionaries.load(tmp_path)
    _saelens_sae("standard", seed=11).save_model(tmp_path)  # same file name, other weights
    stale = sl.HookSpec.from_json(spec.to_json())
    forget_loaded_weights()  # as a fresh worker process, which has read nothing yet
    with pytest.raises(ValueError, match="sha256 .* the file changed since the spec was made"):
        stale.op.dictionary.encode(_inputs())


@pytest.mark.parametrize("make, message", [
    (lambda p: sl.dictionaries.read(p / "missing"), "no such folder or file"),
    (lambda p: sl.dictionaries.read(p), "is not a dictionary: expected a SAELens folder"),
    (lambda p: Dictionary({"W_enc": torch.zeros(4, 8)}), "needs tensors W_enc, W_dec, b_dec, b_enc; missing W_dec, b_dec, b_enc"),
    (lambda p: Dictionary(_tensors(b_enc=torch.zeros(7))), r"b_enc has shape \[7\].* make it \[8\]"),
    (lambda p: Dictionary(_tensors(), architecture="topk"), "k is the number of latents"),
    (lambda p: Dictionary(_tensors(), architecture="relu"), "architecture must be one of standard, gated"),
    (lambda p: Dictionary(_tensors(), normalize_activations="whiten"), "normalize_activations must be one of"),
    (lambda p: sl.ops.Splice(torch.eye(2)), "Splice takes an sl.dictionaries.Dictionary"),
    (lambda p: sl.ops.Splice(Dictionary(_tensors()), error="keep"), "error must be one of add, freeze, drop"),
    (lambda p: Dictionary(_tensors(), dtype="float33"), "dtype must be a torch dtype or its name"),
    (lambda p: Dictionary(_tensors(), transcoder=True, apply_b_dec_to_input=True), "a transcoder's b_dec is in its output space"),
])
def test_bad_dictionaries_are_refused_by_name(make, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make(tmp_path)


def _tensors(**overrides) -> dict:
    tensors = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    return {**tensors, **overrides}
