"""build_stage and Stage: chained stages against the whole Hugging Face model."""

import contextlib
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import shardlens as sl
from shardlens.errors import ShardPlanError
from shardlens.sharding import ShardPlan, StageIO, build_stage
from shardlens.sharding import checkpoint as checkpoint_module
from tests.tiny_models import FAMILIES, load_reference, save_tiny_model


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """The tiny Llama saved as a sharded checkpoint (several files and an index)."""
    folder = tmp_path_factory.mktemp("sharded")
    save_tiny_model("llama_gqa", folder)
    reference = load_reference(folder)
    reference.save_pretrained(folder / "sharded", max_shard_size="20KB")
    assert (folder / "sharded" / "model.safetensors.index.json").exists()
    return folder / "sharded"


def checkpoint_for(name, tiny_checkpoints, sharded_llama):
    return sharded_llama if name == "llama_sharded" else tiny_checkpoints[name]


def chain(stages, io):
    for stage in stages:
        io = stage(io)
    return io


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES + ["llama_sharded"])
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_chained_stages_equal_the_whole_model(tiny_checkpoints, sharded_llama, name, n_stages, tokens):
    source = checkpoint_for(name, tiny_checkpoints, sharded_llama)
    with torch.no_grad():
        expected = load_reference(source)(tokens).logits
    plan = ShardPlan.for_model(source, stages=n_stages)
    stages = [build_stage(source, plan, i) for i in range(n_stages)]
    with torch.no_grad():
        out = chain(stages, StageIO(input_ids=tokens))
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_padding_and_loss_cross_stages(tiny_checkpoints):
    source = tiny_checkpoints["gpt2"]
    tokens = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    whole = sl.HookedModel.from_pretrained(source)
    expected_logits, expected_loss = whole(tokens, attention_mask=mask, return_type="both")
    plan = ShardPlan.for_model(source, stages=3)
    with torch.no_grad():
        out = chain([build_stage(source, plan, i) for i in range(3)], StageIO(input_ids=tokens, attention_mask=mask, labels=tokens))
    assert torch.allclose(out.logits[0, 3:], expected_logits[0, 3:], atol=1e-5)
    assert torch.allclose(out.logits[1], expected_logits[1], atol=1e-5)
    assert torch.allclose(out.loss, expected_loss, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_chained_backward_equals_the_whole_models_gradients(tiny_checkpoints, name, tokens):
    source = tiny_checkpoints[name]
    reference = load_reference(source)
    out = reference(tokens, labels=tokens, output_hidden_states=True)
    hidden = out.hidden_states[:-1]  # inputs of each layer; the last entry is after the final norm
    for h in hidden:
        h.retain_grad()
    out.loss.backward()
    n_layers = reference.config.get_text_config().num_hidden_layers

    plan = ShardPlan.for_model(source, stages=3)
    stages = [build_stage(source, plan, i) for i in range(3)]
    store = {}
    specs = [sl.HookSpec(sl.points(kind), sl.ops.CacheGrad()) for kind in ("resid_pre", "resid_post")]
    with contextlib.ExitStack() as blocks:
        for stage in stages:
            blocks.enter_context(stage.hooks(fwd_hooks=specs, store=store))
        blocks.enter_context(stages[0].hooks(fwd_hooks=[sl.HookSpec("hook_embed", sl.ops.CacheGrad())], store=store))
        io = chain(stages, StageIO(input_ids=tokens, labels=tokens))
        assert torch.allclose(io.loss, out.loss, atol=1e-6)
        grad = None
        for stage in reversed(stages):
            grad = stage.backward(grad)
    assert grad is None  # stage 0 has no input hidden states
    for layer in range(n_layers):
        assert torch.allclose(store[f"blocks.{layer}.hook_resid_pre_grad"], hidden[layer].grad, atol=1e-6), layer
        if layer + 1 < n_layers:
            assert torch.allclose(store[f"blocks.{layer}.hook_resid_post_grad"], hidden[layer + 1].grad, atol=1e-6), layer
    if not reference.config.get_text_config().tie_word_embeddings:  # tied: the whole model adds the unembedding's share
        embed = reference.get_input_embeddings().weight.grad
        assert torch.allclose(stages[0].embed.weight.grad, embed, atol=1e-6)
    # hook_embed is the embedding module's output: Granite multiplies it into the residual stream after
    multiplier = getattr(reference.config, "embedding_multiplier", 1.0)
    assert torch.allclose(store["hook_embed_grad"], multiplier * hidden[0].grad, atol=1e-6)  # (+ position embeddings: same)


def test_stage_hook_points_carry_global_names(tiny_checkpoints):
    source = tiny_checkpoints["llama_gqa"]
    plan = ShardPlan.for_model(source, stages=2)
    first, last = (build_stage(source, plan, i) for i in range(2))
    assert plan.stages[1].layers == range(2, 3)
    assert "hook_embed" in first.hook_names() and "ln_final.hook_scale" not in first.hook_names()
    assert all(not n.startswith("blocks.2.") for n in first.hook_names())
    assert "blocks.2.attn.hook_pattern" in last.hook_names() and "hook_logits" in last.hook_names()
    assert all(not n.startswith(("blocks.0.", "blocks.1.", "hook_embed")) for n in last.hook_names())


def expected_keys(folder, plan, index, architecture):
    """The checkpoint keys stage `index` should read, by plain string matching."""
    stage = plan.stages[index]
    keys = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    wanted = {k for k in keys if any(f"{architecture.blocks}.{layer}." in k for layer in stage.layers)}
    if stage.embed:
        wanted |= {k for k in keys if k.startswith((architecture.embed + ".", f"{architecture.pos_embed}."))}
    if stage.head:
        wanted |= {k for k in keys if k.startswith((architecture.final_norm + ".", "lm_head.", "embed_out."))}
    return wanted


@pytest.mark.parametrize("name", ["gpt_neox", "llama_sharded", "mixtral", "qwen2_moe"])
def test_a_stage_reads_only_its_own_tensors(tiny_checkpoints, sharded_llama, name, monkeypatch):
    source = checkpoint_for(name, tiny_checkpoints, sharded_llama)
    read = []
    real_open = checkpoint_module.safe_open

    class RecordingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(checkpoint_module, "safe_open", RecordingOpen)
    plan = ShardPlan.for_model(source, stages=3)
    architecture = sl.HookedModel.from_pretrained(source).architecture
    for index in range(3):
        read.clear()
        build_stage(source, plan, index)
        assert set(read) == expected_keys(source, plan, index, architecture), index
        assert len(read) == len(set(read))


MEMORY_SCRIPT = """
import resource, sys
import torch, transformers
from shardlens.sharding import ShardPlan, build_stage
source = sys.argv[1]
plan = ShardPlan.for_model(source, stages=4)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stage = build_stage(source, plan, 2)
# safetensors tensors may stay backed by the mapped file until read: touch every weight so
# that what the stage holds is resident when the peak is taken
assert all(torch.isfinite(t.sum()) for t in stage.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) * 1024, plan.stages[2].bytes)
"""


def test_building_one_of_four_stages_stays_far_below_the_whole_model(tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        n_params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    whole = 4 * n_params
    assert whole > 300e6
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    growth, stage_bytes = map(int, out.stdout.split())
    assert stage_bytes < 0.3 * whole  # 4 of 12 layers, no embeddings or head
    assert growth < 0.4 * whole, f"building stage 2 grew resident memory by {growth / 1e6:.0f} MB of a {whole / 1e6:.0f} MB model"


def test_bad_inputs(tiny_checkpoints, tokens):
    source = tiny_checkpoints["llama_gqa"]
    plan = ShardPlan.for_model(source, stages=2)
    with pytest.raises(ShardPlanError, match="stage 2 does not exist"):
        build_stage(source, plan, 2)
    with pytest.raises(ShardPlanError, match="plan is for 'llama'"):
        build_stage(tiny_checkpoints["gpt2"], plan, 0)
    first, last = build_stage(source, plan, 0), build_stage(source, plan, 1)
    with pytest.raises(ValueError, match="takes hidden states"):
        last(StageIO(input_ids=tokens))
    with pytest.raises(ValueError, match="takes token ids"):
        first(StageIO(hidden=torch.zeros(2, 9, 32)))
    with pytest.raises(RuntimeError, match="needs a forward"):
        last.backward()
    with torch.no_grad():
        out = last(first(StageIO(input_ids=tokens)))
    assert out.loss is None and out.logits.shape == (2, 9, 97)


def test_a_plans_layout_that_cannot_be_imported_is_named(tiny_checkpoints):
    source = tiny_checkpoints["llama_gqa"]
    plan = dataclasses.replace(ShardPlan.for_model(source, stages=2), architecture="tests.nowhere:no_architecture")
    with pytest.raises(ShardPlanError, match="'tests.nowhere:no_architecture' cannot be imported"):
        build_stage(source, ShardPlan.from_json(plan.to_json()), 0)
