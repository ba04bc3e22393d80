"""Campaign experiments of kind activations: the dataset's rows against the model's own runs,
padding, resuming after a kill (byte for byte), the schema's errors and the plan."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import shardlens as sl
from shardlens.tables import datasets as datasets_module
from shardlens.tables.datasets import read_manifest, verify_dataset
from shardlens.tracer.campaign import CampaignError, load_campaign, run_campaign, status
from shardlens.tracer.campaign.activations import ActivationDatasets
from shardlens.tracer.campaign.cost import campaign_cost

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "induction"
MODEL = Path(sl.__file__).parent / "data" / "induction"
POINTS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
CAMPAIGN = """name: acts
model: {source: MODEL}
cluster: {backend: local, stages: 2}
data: {path: DATA, batch_size: 8, limit: 24}
experiments:
  - {name: sae, kind: activations, points: [blocks.0.hook_resid_post, blocks.1.attn.hook_z], shard_rows: 40, shuffle_buffer: 80, seed: 1}
output: {path: out, plots: false}
"""


def prompts(ragged: bool = True) -> list[list[int]]:
    """The induction prompts, cut to lengths 5..23 (ragged) or whole."""
    rows = [json.loads(line)["clean"] for line in (EXAMPLE / "prompts.jsonl").read_text().splitlines()]
    return [row[:5 + (i * 7) % 19] if ragged else row for i, row in enumerate(rows)]


def write_campaign(folder: Path, text: str = CAMPAIGN, *, ragged: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"clean": p}) + "\n" for p in prompts(ragged)))
    path = folder / "campaign.yaml"
    path.write_text(text.replace("MODEL", str(MODEL)).replace("DATA", "prompts.jsonl"))
    return path


def dataset(folder: Path) -> dict:
    import datasets

    return datasets.load_from_disk(str(folder)).with_format("numpy")[:]


def dataset_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_rows_are_the_real_tokens_of_the_prompts_with_the_models_values(tmp_path):
    path = write_campaign(tmp_path)
    summary = run_campaign(path, progress=False)  # the campaign's own 2-stage Tracer, prompts padded in each batch
    assert summary["experiments"]["sae"] == {"kind": "activations", "hooks": POINTS, "rows": 323, "shards": 9, "dtype": "float32",
                                             "complete": True}
    got = dataset(tmp_path / "out" / "sae")
    model = sl.HookedModel.from_pretrained(MODEL)
    real = prompts()[:24]
    assert len(got["pos"]) == sum(len(p) for p in real) == 323
    assert sorted(zip(got["example"].tolist(), got["pos"].tolist())) == [(e, p) for e, prompt in enumerate(real) for p in range(len(prompt))]
    for e, prompt in enumerate(real):  # each prompt alone, unpadded, in one process
        _, cache = model.run_with_cache(torch.tensor([prompt]), names_filter=POINTS)
        rows = np.flatnonzero(got["example"] == e)
        positions = got["pos"][rows]
        assert got["token_ids"][rows, 0].tolist() == [prompt[p] for p in positions]
        for name in POINTS:
            expected = cache[name][0, positions].reshape(len(rows), -1).numpy()
            np.testing.assert_allclose(got[name][rows, 0], expected, atol=1e-5, rtol=0)
    verify_dataset(tmp_path / "out" / "sae")
    assert status(tmp_path / "out").experiments[0].done == 3


def test_padding_never_becomes_a_row_and_dtype_converts_exactly(tmp_path):
    model = sl.HookedModel.from_pretrained(MODEL)
    path = write_campaign(tmp_path, CAMPAIGN.replace("seed: 1}", "seed: 1, dtype: float16}"))
    run_campaign(path, progress=False, runner=model)
    got = dataset(tmp_path / "out" / "sae")
    real = prompts()[:24]
    for start in range(0, 24, 8):  # the model's own run of each batch, padded on the right, as an independent reference
        batch = real[start:start + 8]
        tokens = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, prompt in enumerate(batch):
            tokens[i, :len(prompt)], mask[i, :len(prompt)] = torch.tensor(prompt), 1
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=POINTS)
        padding = (mask == 0).nonzero().tolist()
        assert padding  # the batch has padding, and none of it is in the dataset:
        assert not {(start + i, p) for i, p in padding} & set(zip(got["example"].tolist(), got["pos"].tolist()))
        for i, prompt in enumerate(batch):
            rows = np.flatnonzero(got["example"] == start + i)
            for name in POINTS:
                expected = cache[name][i, got["pos"][rows]].reshape(len(rows), -1).half().numpy()
                assert np.array_equal(got[name][rows, 0].astype(np.float16), expected), (name, start + i)
    assert read_manifest(tmp_path / "out" / "sae").spec.dtype == "float16"


@pytest.mark.parametrize("kill", ["before batch 1", "before batch 2", "writing file 3", "writing file 7", "finishing"])
def test_a_killed_campaign_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch, kill):
    run_campaign(write_campaign(tmp_path / "whole"), progress=False)
    expected = dataset_files(tmp_path / "whole" / "out" / "sae")
    killed = write_campaign(tmp_path / "killed")
    real_run, real_write, real_finish = ActivationDatasets.run, datasets_module._write_stream, datasets_module.DatasetWriter._finish

    def dying_run(self, experiment, batch, runner):
        if kill == f"before batch {batch}":
            raise KeyboardInterrupt("killed")
        real_run(self, experiment, batch, runner)

    def dying_write(path, schema, batch):
        if kill == f"writing file {int(path.name[6:11])}":
            path.write_bytes(b"half a file")  # what a kill mid-write leaves
            raise KeyboardInterrupt("killed")
        return real_write(path, schema, batch)

    def dying_finish(self):  # every file listed, datasets' files not yet written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ActivationDatasets, "run", dying_run)
    monkeypatch.setattr(datasets_module, "_write_stream", dying_write)
    if kill == "finishing":
        monkeypatch.setattr(datasets_module.DatasetWriter, "_finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(killed, progress=False)
    monkeypatch.setattr(ActivationDatasets, "run", real_run)
    monkeypatch.setattr(datasets_module, "_write_stream", real_write)
    monkeypatch.setattr(datasets_module.DatasetWriter, "_finish", real_finish)
    out = tmp_path / "killed" / "out" / "sae"
    assert not (out / "state.json").exists()
    manifest = read_manifest(out)
    listed = {f.file for f in manifest.files}
    for index in range(9):  # a kill between a file's rename and the manifest: a file no manifest lists
        name = f"data-{index:05d}-of-00009.arrow"
        if name not in listed:
            (out / name).write_bytes(b"renamed, never listed")
            break
    done = len(list((out / "_done").iterdir())) if (out / "_done").exists() else 0
    summary = run_campaign(killed, progress=False)
    assert summary["units_run_now"] == 3 - done  # only batches with rows in unfinished files run again
    assert dataset_files(out) == expected
    assert sorted(p.name for p in (out / "_done").iterdir()) == ["b00000.json", "b00001.json", "b00002.json"]


def test_a_rerun_of_a_finished_campaign_runs_nothing_and_refuses_other_settings(tmp_path):
    path = write_campaign(tmp_path)
    run_campaign(path, progress=False)
    before = dataset_files(tmp_path / "out" / "sae")
    assert run_campaign(path, progress=False)["units_run_now"] == 0
    assert dataset_files(tmp_path / "out" / "sae") == before
    path.write_text(path.read_text().replace("seed: 1", "seed: 2"))
    with pytest.raises(CampaignError, match=r"holds a dataset written by other settings .*remove it to write it again"):
        run_campaign(path, progress=False)
    assert dataset_files(tmp_path / "out" / "sae") == before


@pytest.mark.parametrize("old, new, message", [
    ("shard_rows: 40", "shard_rows: 0", r"campaign.yaml:6: experiment.shard_rows must be an int >= 1; got 0"),
    ("shuffle_buffer: 80", "shuffle_buffer: 50", r"campaign.yaml:6: experiment.shuffle_buffer must be a multiple of shard_rows=40; got 50"),
    ("seed: 1", "seed: -1", r"campaign.yaml:6: experiment.seed must be an int >= 0; got -1"),
    ("seed: 1", "seed: 1, dtype: float8", r"campaign.yaml:6: experiment.dtype must be one of float32, bfloat16, float16; got 'float8'"),
    ("shard_rows: 40", "shard_rows: many", r"campaign.yaml:6: experiment.shard_rows must be int; got 'many'"),
    ("seed: 1", "seed: 1, dtype: bfloat16", r"campaign.yaml:6: experiment.dtype bfloat16 would be stored as its uint16 bits, which SAELens "
                                           r"reads as integers .*: use float32 \(exact for bfloat16 activations, the default for them\) or float16"),
])
def test_bad_keys_name_the_line_and_what_is_valid(tmp_path, old, new, message):
    path = write_campaign(tmp_path, CAMPAIGN.replace(old, new))
    with pytest.raises(CampaignError, match=message):
        load_campaign(path)


def test_points_without_a_fixed_shape_per_token_are_refused(tmp_path):
    path = write_campaign(tmp_path, CAMPAIGN.replace("[blocks.0.hook_resid_post, blocks.1.attn.hook_z]", "blocks.0.attn.hook_pattern"))
    with pytest.raises(CampaignError, match=r"needs hook points with a fixed shape per token; .* gives \['blocks.0.attn.hook_pattern'\]"):
        run_campaign(path, progress=False)
    assert not (tmp_path / "out" / "sae").exists()


def test_plan_costs_an_activations_experiment_as_one_forward_writing_its_tokens(tmp_path):
    import transformers

    text = CAMPAIGN.replace("seed: 1}", "seed: 1, dtype: float16}")
    cost = campaign_cost(write_campaign(tmp_path, text, ragged=False))
    config = transformers.AutoConfig.from_pretrained(MODEL)
    per_token = config.hidden_size + config.num_attention_heads * config.head_dim  # resid_post; z's heads x d_head
    (experiment,) = cost.experiments
    assert (experiment.kind, experiment.points, experiment.forwards) == ("activations", tuple(POINTS), 1.0)
    assert experiment.written_bytes == 24 * 23 * per_token * 2  # float16
    ragged = campaign_cost(write_campaign(tmp_path / "ragged", text))  # padded shapes: the plan does not refuse ragged prompts
    assert ragged.seq_len == 23 and ragged.experiments[0].forwards == 1.0


def test_the_dataset_moves_with_its_folder(tmp_path):
    path = write_campaign(tmp_path / "a")
    run_campaign(path, progress=False)
    original = dataset(tmp_path / "a" / "out" / "sae")
    shutil.move(tmp_path / "a" / "out" / "sae", tmp_path / "moved")
    assert verify_dataset(tmp_path / "moved").complete
    got = dataset(tmp_path / "moved")
    assert got.keys() == original.keys() and all(np.array_equal(got[key], original[key]) for key in original)


def test_bfloat16_activations_are_written_as_float32_exactly_and_saelens_reads_them(tmp_path):
    from sae_lens.training.activations_store import ActivationsStore

    path = write_campaign(tmp_path, CAMPAIGN.replace("model: {source: MODEL}", "model: {source: MODEL, dtype: bfloat16}"))
    run_campaign(path, progress=False)  # the campaign's own 2-stage Tracer, in bfloat16
    folder = tmp_path / "out" / "sae"
    assert read_manifest(folder).spec.dtype == "float32"
    got = dataset(folder)
    model = sl.HookedModel.from_pretrained(MODEL, dtype=torch.bfloat16)
    for name in POINTS:
        assert got[name].dtype == np.float32
        assert not (got[name].view(np.uint32) & 0xFFFF).any()  # bfloat16 values, widened without rounding
    rows = np.flatnonzero(got["example"] == 0)  # prompt 0, alone in one process, as a reference
    _, cache = model.run_with_cache(torch.tensor([prompts()[0]]), names_filter=POINTS)
    expected = cache[POINTS[0]][0, got["pos"][rows]].float().numpy()
    np.testing.assert_allclose(got[POINTS[0]][rows, 0], expected, atol=0.05, rtol=0.02)
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=POINTS[0], hook_head_index=None, context_size=1, d_in=got[POINTS[0]].shape[-1],
        n_batches_in_buffer=2, total_training_tokens=323, store_batch_size_prompts=100, train_batch_size_tokens=100, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32", cached_activations_path=str(folder),
    )
    read = torch.cat([store.get_raw_llm_batch(raise_on_epoch_end=True)[0] for _ in range(3)])  # the first 300 rows
    assert torch.equal(read, torch.from_numpy(got[POINTS[0]][:300, 0]))


def test_plan_counts_bfloat16_activations_as_the_float32_they_are_written_in(tmp_path):
    text = CAMPAIGN.replace("model: {source: MODEL}", "model: {source: MODEL, dtype: bfloat16}")
    (experiment,) = campaign_cost(write_campaign(tmp_path, text, ragged=False)).experiments
    import transformers

    config = transformers.AutoConfig.from_pretrained(MODEL)
    assert experiment.written_bytes == 24 * 23 * (config.hidden_size + config.num_attention_heads * config.head_dim) * 4


def test_checksum_false_skips_the_hashes_and_writes_the_same_files(tmp_path, monkeypatch):
    from shardlens.tracer.campaign import schema

    monkeypatch.setitem(schema.SCHEMA["experiment"], "checksum", bool)  # a no-op once schema.py lists the key
    run_campaign(write_campaign(tmp_path / "hashed"), progress=False)
    run_campaign(write_campaign(tmp_path / "plain", CAMPAIGN.replace("seed: 1}", "seed: 1, checksum: false}")), progress=False)
    hashed, plain = read_manifest(tmp_path / "hashed" / "out" / "sae"), verify_dataset(tmp_path / "plain" / "out" / "sae")
    assert plain.complete and [f.sha256 for f in plain.files] == [None] * 9 and all(f.sha256 for f in hashed.files)
    data = lambda folder: {k: v for k, v in dataset_files(folder).items() if k.endswith(".arrow")}  # noqa: E731
    assert data(tmp_path / "plain" / "out" / "sae") == data(tmp_path / "hashed" / "out" / "sae")
    with pytest.raises(CampaignError, match=r"campaign.yaml:6: experiment.checksum must be bool; got 'no'"):
        load_campaign(write_campaign(tmp_path / "bad", CAMPAIGN.replace("seed: 1}", "seed: 1, checksum: 'no'}")))


def test_a_finished_dataset_is_not_tokenized_again(tmp_path, monkeypatch):
    from shardlens.tracer.campaign import activations

    path = write_campaign(tmp_path)
    run_campaign(path, progress=False)
    calls = []
    real = activations.token_ids
    monkeypatch.setattr(activations, "token_ids", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    assert run_campaign(path, progress=False)["units_run_now"] == 0
    assert calls == []
    (tmp_path / "out" / "sae" / "_done" / "b00002.json").unlink()  # a marker lost: the token counts are needed again
    assert run_campaign(path, progress=False)["units_run_now"] == 0 and len(calls) == 3
    assert (tmp_path / "out" / "sae" / "_done" / "b00002.json").exists()
