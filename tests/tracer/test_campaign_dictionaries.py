"""A campaign's dictionaries key: the dictionaries are spliced into every run of the campaign
(its own 2-stage Tracer, a runner passed in, and verify's reference), so experiments read
their latents; plan knows their sizes; bad entries name the line."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import shardlens as sl
from shardlens.tracer.campaign import CampaignError, load_campaign, run_campaign
from shardlens.tracer.campaign.cost import campaign_cost
from shardlens.tracer.campaign.verify import verify
from shardlens.tracer.demo import MODEL
from tests.tracer.test_campaign_top_contexts import EXAMPLES, naive_top_contexts, prompts, result, write_campaign

POINT = "blocks.1.hook_resid_mid"  # the demo model: d_model 64, layer 1 on the second stage
LATENTS = POINT + ".sae.hook_latents"
D_SAE = 96
DICTIONARIES = f"dictionaries:\n  - {{path: sae.safetensors, point: {POINT}}}\n"
LATENT_ATP = f"  - {{name: atp, kind: atp, points: {LATENTS}, over: [layer, feature]}}\n"
LATENT_CONTEXTS = f"  - {{name: latents, kind: top_contexts, points: {LATENTS}, k: 4, window: 2, sparse: true}}\n"


def save_sae(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(64, D_SAE, generator=g) * 0.3, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "W_dec": torch.randn(D_SAE, 64, generator=g) * 0.3, "b_dec": torch.zeros(64),
               "threshold": torch.full((D_SAE,), 0.2)}, folder / "sae.safetensors")
    return folder / "sae.safetensors"


def campaign_with_dictionaries(folder: Path, experiments: str = LATENT_CONTEXTS) -> Path:
    """The top_contexts tests' campaign with the SAE spliced in, and rows with every field."""
    save_sae(folder)
    path = write_campaign(folder, experiments)
    path.write_text(DICTIONARIES + path.read_text())
    examples = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    rows = [{**example, "clean": clean} for clean, example in zip(prompts(), examples)]  # the same clean prompts
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_top_contexts_of_latents_on_the_campaigns_tracer_equal_a_spliced_model(tmp_path):
    path = campaign_with_dictionaries(tmp_path)
    run_campaign(path, progress=False)  # its own Tracer: local, 2 stages
    model = sl.HookedModel.from_pretrained(MODEL)
    with model.hooks(fwd_hooks=[sl.dictionaries.load(tmp_path / "sae.safetensors", point=POINT)]):
        expected = naive_top_contexts(model, k=4, window=2, points=[LATENTS])
    got = result(tmp_path / "out", "latents")
    assert got == expected and {r["feature"] for r in got} >= set(range(0, D_SAE, 10))
    assert not model.list_hooks()  # the splice was for the block only
    runner = sl.HookedModel.from_pretrained(MODEL)
    run_campaign(campaign_with_dictionaries(tmp_path / "again"), progress=False, runner=runner)  # a runner passed in
    assert result(tmp_path / "again" / "out", "latents") == expected
    assert not runner.list_hooks()  # left as it was given


def test_attribution_per_latent_in_a_campaign_equals_a_spliced_model(tmp_path):
    path = campaign_with_dictionaries(tmp_path, LATENT_ATP)
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    run_campaign(path, progress=False, runner=sl.HookedModel.from_pretrained(MODEL))
    table = pq.read_table(tmp_path / "out" / "atp" / "part-b00000.parquet")
    model = sl.HookedModel.from_pretrained(MODEL)
    clean, corrupt = (torch.tensor([r[k] for r in rows[:8]]) for k in ("clean", "corrupt"))
    metric = sl.metrics.logit_diff(torch.tensor([r["answer"] for r in rows[:8]]), torch.tensor([r["wrong"] for r in rows[:8]]))
    with model.hooks(fwd_hooks=[sl.dictionaries.load(tmp_path / "sae.safetensors", point=POINT)]):
        expected = sl.attribution.atp(model, clean, corrupt, points=LATENTS, metric=metric, over=("layer", "feature"))
    assert table.column("feature").to_pylist() == list(range(D_SAE))
    assert table.column("value").to_pylist() == pytest.approx(expected.grid[0].tolist(), abs=1e-6)
    mean = torch.tensor([pq.read_table(part).column("value").to_pylist() for part in sorted((tmp_path / "out" / "atp").glob("part-*"))]).mean(0)
    assert f"at {LATENTS}, feature {int(mean.abs().argmax())}" in (tmp_path / "out" / "summary.md").read_text()


def test_verify_and_plan_see_the_spliced_points(tmp_path):
    extract = f"  - {{name: acts, kind: extract, points: {LATENTS}, layout: token}}\n"
    path = campaign_with_dictionaries(tmp_path, LATENT_CONTEXTS + LATENT_ATP + extract)
    checked = verify(path, examples=4)
    assert checked.ok and any(d.point.startswith(LATENTS) and d.scale > 0 for d in checked.differences)
    cost = campaign_cost(path)
    latents, atp, acts = cost.experiments
    assert latents.points == atp.points == acts.points == (LATENTS,)
    assert acts.written_bytes == 20 * 23 * D_SAE * 4  # every token's latents, float32, from the dictionary's size
    assert latents.written_bytes == 3 * 4 * D_SAE * (24 + len(LATENTS))  # 3 batches, k rows per latent
    assert atp.forwards == 3.0  # a batch's: clean, corrupt and its backward


@pytest.mark.parametrize("entry, message", [
    ("{path: sae.safetensors, point: x, errror: add}", "unknown key 'errror' in dictionary"),
    ("{path: sae.safetensors, error: keep}", "dictionary.error must be one of add, freeze, drop"),
    ("{point: blocks.1.hook_resid_mid}", "dictionary lacks 'path'"),
])
def test_bad_dictionary_entries_name_the_line(tmp_path, entry, message):
    path = campaign_with_dictionaries(tmp_path)
    path.write_text(path.read_text().replace(f"{{path: sae.safetensors, point: {POINT}}}", entry))
    with pytest.raises(CampaignError, match=f"campaign.yaml:2: .*{message}"):
        load_campaign(path)
