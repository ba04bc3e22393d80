"""ShardPlan: balanced contiguous stages, device maps, JSON, errors."""

import itertools
import random

import pytest
import torch
import transformers

from shardlens.errors import ShardPlanError
from shardlens.sharding import ShardPlan
from shardlens.sharding.plan import balance
from tests.tiny_models import FAMILIES, tiny_config


def brute_force_best(sizes, stages, first, last):
    """The smallest largest-stage total over every way to cut `sizes` into `stages` ranges."""
    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        totals = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
        totals[0] += first
        totals[-1] += last
        best = max(totals) if best is None else min(best, max(totals))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balance_is_optimal_and_contiguous(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
    stages = rng.randint(1, len(sizes))
    first, last = rng.randint(0, 150), rng.randint(0, 150)
    ranges = balance(sizes, stages, first_extra=first, last_extra=last)
    assert [i for r in ranges for i in r] == list(range(len(sizes)))
    assert all(len(r) >= 1 for r in ranges) and len(ranges) == stages
    totals = [sum(sizes[i] for i in r) for r in ranges]
    totals[0] += first
    totals[-1] += last
    assert max(totals) == brute_force_best(sizes, stages, first, last)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_plan_covers_the_layers_with_embeddings_first_and_head_last(name, stages):
    config = tiny_config(name)
    plan = ShardPlan.for_model(config, stages=stages)
    assert [layer for s in plan.stages for layer in s.layers] == list(range(config.get_text_config().num_hidden_layers))
    assert [s.embed for s in plan.stages] == [True] + [False] * (stages - 1)
    assert [s.head for s in plan.stages] == [False] * (stages - 1) + [True]
    model = transformers.AutoModelForCausalLM.from_config(config)
    vision = ("model.vision_tower.", "model.multi_modal_projector.")  # a multimodal Gemma 3's: in no stage
    # named_parameters lists a tied head's weight once, as the embedding; the last stage holds its own copy of it
    distinct_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(vision))
    tied_head_copy = model.get_output_embeddings().weight.numel() if config.tie_word_embeddings else 0
    assert sum(s.bytes for s in plan.stages) == 4 * (distinct_params + tied_head_copy)  # float32
    assert ShardPlan.from_json(plan.to_json()) == plan


def test_dtype_sets_the_bytes():
    config = tiny_config("llama_gqa")
    fp32 = ShardPlan.for_model(config, stages=2)
    bf16 = ShardPlan.for_model(config, stages=2, dtype=torch.bfloat16)
    assert [s.bytes for s in bf16.stages] == [s.bytes // 2 for s in fp32.stages] and bf16.dtype == "bfloat16"


def test_describe_prints_a_table(capsys):
    plan = ShardPlan.for_model(tiny_config("gpt2"), stages=2)
    text = plan.describe()
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[1].split() == ["stage", "layers", "devices", "GB"]
    assert lines[2].split()[:4] == ["0", "0-0", "+", "embed"] and lines[3].split()[:4] == ["1", "1-2", "+", "head"]


def test_device_map_spreads_a_stage_over_its_devices():
    config = tiny_config("llama_gqa")
    whole = ShardPlan.for_model(config, stages=1).stages[0].bytes
    per_device = int(whole * 0.7)  # bytes, as accelerate takes them
    plan = ShardPlan.for_model(config, stages=1, max_memory={0: per_device, 1: per_device})
    spec = plan.stages[0]
    assert spec.devices == (0, 1)
    assert set(spec.device_map.values()) == {0, 1}
    covered = {key.split(".")[0] for key in spec.device_map}
    assert covered >= {"embed", "blocks", "final_norm", "unembed"}
    assert ShardPlan.from_json(plan.to_json()) == plan


def test_impossible_plans_say_why():
    with pytest.raises(ShardPlanError, match="stages=4 but the model has 3 layers"):
        ShardPlan.for_model(tiny_config("gpt2"), stages=4)
    with pytest.raises(ShardPlanError, match="stages must be a positive int"):
        ShardPlan.for_model(tiny_config("gpt2"), stages=0)
    with pytest.raises(ShardPlanError, match="unknown architecture 'bert'"):
        ShardPlan.for_model(transformers.BertConfig(num_hidden_layers=2), stages=1)
    with pytest.raises(ShardPlanError, match=r"stage 0 \(layers 0-1\) holds .* kB of parameters, but max_memory gives a stage 20 kB"):
        ShardPlan.for_model(tiny_config("llama_gqa"), stages=2, max_memory={0: "10KB", 1: "10KB"})
    with pytest.raises(ShardPlanError, match="dtype"):
        ShardPlan.for_model(tiny_config("gpt2"), stages=1, dtype="float99")


def test_stage_resources_pin_stages_and_travel_with_the_plan(capsys):
    config = tiny_config("llama_gqa")
    plan = ShardPlan.for_model(config, stages=2, stage_resources=[{"node_a": 1}, {"node_b": 0.5, "ssd": 1}])
    assert [s.resources for s in plan.stages] == [{"node_a": 1}, {"node_b": 0.5, "ssd": 1}]
    assert ShardPlan.from_json(plan.to_json()) == plan
    lines = plan.describe().splitlines()
    assert lines[1].split()[-1] == "resources" and lines[3].endswith("node_b=0.5, ssd=1")
    assert all(s.resources == {} for s in ShardPlan.for_model(config, stages=2).stages)
    assert plan.stages[0].host_bytes == plan.stages[0].bytes  # a CPU stage keeps its weights in host memory


@pytest.mark.parametrize("bad, message", [
    ([{"node_a": 1}], r"a list of 2 dicts, one per stage"),
    ({"node_a": 1}, r"a list of 2 dicts"),
    ([{"node_a": 1}, {"node_b": 0}], r"stage_resources\[1\] must map resource names to positive numbers"),
    ([{"node_a": 1}, ["node_b"]], r"stage_resources\[1\] must map"),
    ([{"CPU": 2}, {}], r"stage_resources\[0\] names \['CPU'\]: the plan sets CPUs, GPUs and memory itself"),
])
def test_bad_stage_resources_say_what_is_wrong(bad, message):
    with pytest.raises(ShardPlanError, match=message):
        ShardPlan.for_model(tiny_config("llama_gqa"), stages=2, stage_resources=bad)


LLAMA_70B = dict(  # meta-llama/Llama-3.1-70B's config.json, as written by hand (no weights)
    model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False, torch_dtype="bfloat16",
)
GEMMA2_27B = dict(  # google/gemma-2-27b's
    model_type="gemma2", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
    num_key_value_heads=16, head_dim=128, vocab_size=256000, sliding_window=4096, query_pre_attn_scalar=144,
    tie_word_embeddings=True, torch_dtype="float32",
)


@pytest.mark.parametrize("fields, billions, dtype", [(LLAMA_70B, 70.55, "bfloat16"), (GEMMA2_27B, 27.23, "float32")])
def test_a_plan_is_sized_in_the_dtype_the_config_names(tmp_path, fields, billions, dtype):
    import json

    (tmp_path / "config.json").write_text(json.dumps(fields))
    plan = ShardPlan.for_model(tmp_path, stages=4)
    assert plan.dtype == dtype
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    head_copy = fields["vocab_size"] * fields["hidden_size"] if fields["tie_word_embeddings"] else 0  # the last stage's own unembedding
    assert sum(s.bytes for s in plan.stages) == pytest.approx((billions * 1e9 + head_copy) * size, rel=2e-3)
    assert ShardPlan.for_model(tmp_path, stages=4, dtype=torch.float16).dtype == "float16"


def test_with_no_dtype_in_the_config_a_plan_takes_the_weights_dtype(tiny_checkpoints, tmp_path):
    import json

    import shardlens as sl
    from tests.tiny_models import load_reference

    load_reference(tiny_checkpoints["llama_gqa"]).to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ShardPlan.for_model(tmp_path, stages=2).dtype == "bfloat16"
    assert sl.HookedModel.from_pretrained(tmp_path).model.dtype == torch.bfloat16  # transformers' dtype="auto" agrees
    assert ShardPlan.for_model(transformers.AutoConfig.from_pretrained(tmp_path), stages=2).dtype == "float32"  # no weights to read
