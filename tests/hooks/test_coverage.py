"""Which model families shardlens covers, out of every decoder-only causal LM transformers knows."""

import transformers

from shardlens.hooks.architectures import ARCHITECTURES, decoder_model_types
from shardlens.tracer.cli import main
from tests.tiny_models import FAMILY_CONFIGS

# The families issue 17 asked for, by model_type (Gemma 3's text model is gemma3_text).
ASKED = {
    "gptj", "falcon", "phi", "phi3", "stablelm", "starcoder2", "granite", "cohere", "olmo2", "gemma", "gemma2",
    "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
    "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3",
}


def test_every_decoder_only_causal_lm_type_is_listed_covered_or_not(capsys):
    known = decoder_model_types()
    covered = sorted(set(known) & set(ARCHITECTURES))
    print(f"\ntransformers {transformers.__version__}: {len(covered)} of {len(known)} decoder-only causal LM types covered")
    print("covered:", " ".join(covered))
    print("module: points only:", " ".join(sorted(set(known) - set(ARCHITECTURES))))
    assert ASKED <= set(covered)
    assert set(ARCHITECTURES) <= set(known), sorted(set(ARCHITECTURES) - set(known))  # no architecture for a type transformers lacks
    assert {"bert", "t5", "bart", "whisper"}.isdisjoint(known)  # encoders and encoder-decoders are not listed
    assert {config[0] for config in FAMILY_CONFIGS.values()} == set(ARCHITECTURES)  # every covered type has a tiny checkpoint


def test_the_cli_lists_them(capsys):
    assert main(["families", "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{len(ARCHITECTURES)} of the {len(decoder_model_types())} decoder-only causal LM types")
    assert "gemma3_text" in out[1].split() and "bloom" in out[3].split()
