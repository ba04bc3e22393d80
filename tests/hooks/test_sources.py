"""A model source that is no checkpoint says what it is and what was expected, on every road
that loads a model: HookedModel.from_pretrained, a shard plan, a Tracer (the command line's
messages are tested in tests/tracer/test_cli.py)."""

import pytest

import shardlens as sl
from shardlens.hooks.sources import model_config


def test_a_folder_without_a_config_and_a_file_say_what_a_checkpoint_is(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(sl.ModelSourceError, match=r": a folder without config.json: expected a checkpoint folder \(config.json"):
        model_config(tmp_path)
    with pytest.raises(sl.ModelSourceError, match=r"notes.txt: a file, not a model: expected a checkpoint folder .* or a Hugging Face hub id"):
        model_config(tmp_path / "notes.txt")


@pytest.mark.parametrize("load", [
    lambda source: sl.HookedModel.from_pretrained(source),
    lambda source: sl.ShardPlan.for_model(source, stages=1),
    lambda source: sl.Tracer.from_pretrained(source, stages=1, backend="local"),
], ids=["HookedModel", "ShardPlan", "Tracer"])
def test_every_loader_names_a_missing_folder_that_is_no_hub_id_either(load):
    with pytest.raises(sl.ModelSourceError, match=r"^/no/such/dir: no such folder, and not a Hugging Face hub id either \(a hub id looks like 'org/name'\)$"):
        load("/no/such/dir")


def test_a_checkpoint_loads_its_config(tmp_path):
    from tests.tiny_models import save_tiny_model

    folder = save_tiny_model("llama_gqa", tmp_path)
    assert model_config(folder).model_type == "llama"
