import re
from pathlib import Path

import pytest

from shardlens.serve.config import ConfigError, Limits, ModelEntry, ServiceConfig, TokenEntry, hash_token, load_config, new_token

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = hash_token("alice-token"), hash_token("bob-token")


def write(tmp_path: Path, text: str) -> Path:
    """The config `text` at tmp_path/service/service.yaml, next to an (empty) checkpoint folder tmp_path/ckpt."""
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "service").mkdir(exist_ok=True)
    path = tmp_path / "service" / "service.yaml"
    path.write_text(text)
    return path


def test_the_example_config_serves_the_demo_model():
    config = load_config(ROOT / "examples" / "serve" / "service.yaml")
    assert config.models == (ModelEntry(name="induction", source=str(ROOT / "shardlens" / "data" / "induction"), stages=2, backend="ray"),)
    assert config.tokens == (TokenEntry(name="demo", sha256=hash_token("demo-token-change-me")),)
    assert (config.host, config.port, config.address, config.limits) == ("127.0.0.1", 8000, None, Limits())


def test_everything_given_is_read(tmp_path):
    path = write(tmp_path, f"""\
host: 0.0.0.0
port: 9000
address: auto
limits: {{tokens_per_request: 100, cached_bytes: 2000, concurrent: 3, per_minute: 40}}
models:
  - name: m
    source: ../ckpt
    dtype: bfloat16
    stages: 2
    replicas: 3
    backend: local
    microbatch_size: 4
    device: cpu
    max_batch: 5
    max_queue: 6
tokens:
  - {{name: alice, sha256: {ALICE}, models: [m]}}
""")
    config = load_config(path)
    assert config.models == (ModelEntry(name="m", source=str(tmp_path / "ckpt"), dtype="bfloat16", stages=2, replicas=3, backend="local",
                                        microbatch_size=4, device="cpu", max_batch=5, max_queue=6),)
    assert config.tokens == (TokenEntry(name="alice", sha256=ALICE, limits=Limits(100, 2000, 3, 40), models=("m",)),)
    assert (config.host, config.port, config.address, config.limits) == ("0.0.0.0", 9000, "auto", Limits(100, 2000, 3, 40))


def test_a_tokens_limits_are_merged_over_the_services(tmp_path):
    path = write(tmp_path, f"""\
limits: {{concurrent: 3, per_minute: 40}}
models: [{{name: m, source: ../ckpt}}]
tokens:
  - {{name: alice, sha256: {ALICE}, limits: {{concurrent: 2}}}}
  - {{name: bob, sha256: {BOB}}}
""")
    alice, bob = load_config(path).tokens
    assert alice.limits == Limits(tokens_per_request=65_536, cached_bytes=1 << 30, concurrent=2, per_minute=40)
    assert bob.limits == Limits(tokens_per_request=65_536, cached_bytes=1 << 30, concurrent=3, per_minute=40)


def test_an_absolute_source_is_kept(tmp_path):
    path = write(tmp_path, f"models: [{{name: m, source: {tmp_path / 'ckpt'}}}]\ntokens: []\n")
    assert load_config(path).models[0].source == str(tmp_path / "ckpt")


TOKEN = f"tokens: [{{name: alice, sha256: {ALICE}}}]\n"
MODEL = "models: [{name: m, source: ../ckpt}]\n"


@pytest.mark.parametrize("text, line, message", [
    (MODEL + TOKEN + "prot: 8000\n", 3, "prot is not a key of the config; known: host, port, address, limits, models, tokens"),
    (TOKEN, 1, "the config lacks the required key 'models'"),
    (MODEL, 1, "the config lacks the required key 'tokens'"),
    (MODEL + TOKEN + "port: '8000'\n", 3, "port must be an int; got '8000'"),
    (MODEL + TOKEN + "port: 70000\n", 3, "port must be an int from 1 to 65535; got 70000"),
    (MODEL + TOKEN + "limits: [1]\n", 3, "limits must be a mapping; got [1]"),
    (MODEL + TOKEN + "limits: {concurrent: 0}\n", 3, "limits.concurrent must be a positive int; got 0"),
    (MODEL + TOKEN + "limits: {per_minute: true}\n", 3, "limits.per_minute must be an int; got True"),
    (MODEL + TOKEN + "limits: {burst: 3}\n", 3, "limits.burst is not a key of limits; known: tokens_per_request, cached_bytes, concurrent, per_minute"),
    ("models: []\n" + TOKEN, 1, "models must hold at least one model; got none"),
    ("models: [m]\n" + TOKEN, 1, "models[0] must be a mapping; got 'm'"),
    ("models:\n  - name: m\n    source: ../ckpt\n    stage: 2\n" + TOKEN, 4,
     "models[0].stage is not a key of models[0]; known: name, source, dtype, stages, replicas, backend, microbatch_size, device, max_batch, max_queue"),
    ("models:\n  - name: m\n" + TOKEN, 2, "models[0] lacks the required key 'source'"),
    ("models: [{source: ../ckpt}]\n" + TOKEN, 1, "models[0] lacks the required key 'name'"),
    ("models:\n  - {name: m, source: ../ckpt, dtype: fp8}\n" + TOKEN, 2,
     "models[0].dtype must be one of float32, bfloat16, float16 or null (the checkpoint's own); got 'fp8'"),
    ("models:\n  - {name: m, source: ../ckpt, backend: k8s}\n" + TOKEN, 2, "models[0].backend must be one of ray, local; got 'k8s'"),
    ("models:\n  - name: m\n    source: ../ckpt\n    stages: 0\n" + TOKEN, 4, "models[0].stages must be a positive int; got 0"),
    ("models:\n  - {name: m, source: ../ckpt, stages: true}\n" + TOKEN, 2, "models[0].stages must be an int; got True"),
    ("models:\n  - {name: a/b, source: ../ckpt}\n" + TOKEN, 2,
     "models[0].name must be letters, digits, '_', '.' and '-', starting with a letter or digit; got 'a/b'"),
    ("models:\n  - {name: m, source: ../ckpt}\n  - {name: m, source: ../ckpt}\n" + TOKEN, 3,
     "models[1].name repeats models[0]'s ('m'); each model's name must be unique"),
    (MODEL + "tokens:\n  - {name: alice}\n", 3, "tokens[0] lacks the required key 'sha256'"),
    (MODEL + f"tokens:\n  - {{sha256: {ALICE}}}\n", 3, "tokens[0] lacks the required key 'name'"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE}, model: [m]}}\n", 3,
     "tokens[0].model is not a key of tokens[0]; known: name, sha256, limits, models"),
    (MODEL + "tokens:\n  - {name: alice, sha256: abc123}\n", 3, "tokens[0].sha256 must be the token's hex SHA-256, 64 lowercase hex characters "
     "(`shardlens token NAME` prints one); got a string of 6 characters"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE.upper()}}}\n", 3, "tokens[0].sha256 must be the token's hex SHA-256, 64 lowercase hex "
     "characters (`shardlens token NAME` prints one); got a string of 64 characters"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE}, models: m}}\n", 3, "tokens[0].models must be a list or null; got 'm'"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE}, models: [n]}}\n", 3,
     "tokens[0].models names 'n', which the service does not host; its models: m"),
    (MODEL + f"tokens:\n  - name: alice\n    sha256: {ALICE}\n    limits: {{concurrent: -1}}\n", 5,
     "tokens[0].limits.concurrent must be a positive int; got -1"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE}}}\n  - {{name: alice, sha256: {BOB}}}\n", 4,
     "tokens[1].name repeats tokens[0]'s ('alice'); each token's name must be unique"),
    (MODEL + f"tokens:\n  - {{name: alice, sha256: {ALICE}}}\n  - {{name: bob, sha256: {ALICE}}}\n", 4,
     "tokens[1].sha256 repeats tokens[0]'s ('alice'); each token's sha256 must be unique"),
    ("", 1, "the config must be a mapping; got None"),
])
def test_a_broken_config_names_the_file_line_and_key(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:{line}: {message}"


def test_a_raw_token_is_refused_without_echoing_it(tmp_path):
    path = write(tmp_path, MODEL + "tokens:\n  - {name: alice, token: alice-token}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:3: tokens[0].token is a raw token, which the config must not hold: replace it with `sha256: <hex>`, the token's hash "
        f"(this token's: sha256: {ALICE}); `shardlens token NAME` makes a new token and prints its line"
    )
    assert "alice-token" not in str(info.value)


def test_a_missing_source_folder_is_refused(tmp_path):
    path = write(tmp_path, "models:\n  - {name: m, source: ../nowhere}\n" + TOKEN)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}:2: models[0].source is no checkpoint folder: nothing at {tmp_path / 'nowhere'} "
                               "(a relative source is relative to the config file's folder)")


def test_a_key_given_twice_is_refused(tmp_path):
    path = write(tmp_path, MODEL + TOKEN + "port: 8000\nport: 9000\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML: the key 'port' appears twice in \"<unicode string>\", line 4")):
        load_config(path)


def test_a_file_that_is_not_yaml_or_not_there_is_a_config_error(tmp_path):
    path = write(tmp_path, "models: [\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML: ")):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.yaml'}: cannot read: No such file or directory")):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("make, message", [
    (lambda: Limits(concurrent=0), "concurrent must be a positive int; got 0"),
    (lambda: Limits(per_minute=True), "per_minute must be a positive int; got True"),
    (lambda: Limits(cached_bytes=1.5), "cached_bytes must be a positive int; got 1.5"),
    (lambda: ModelEntry(name="m", source="/x", microbatch_size=0), "microbatch_size must be a positive int; got 0"),
    (lambda: ModelEntry(name="m", source=""), "source must be a non-empty string; got ''"),
    (lambda: TokenEntry(name="", sha256=ALICE), "name must be a non-empty string; got ''"),
    (lambda: TokenEntry(name="a", sha256=ALICE, models=["m"]), "models must be None (all models) or a tuple of model names; got ['m']"),
    (lambda: ServiceConfig(models=(), tokens=()), "models must hold at least one model; got none"),
    (lambda: ServiceConfig(models=(ModelEntry("m", "/x"),), tokens=(), host=""), "host must be a non-empty string; got ''"),
])
def test_the_dataclasses_check_their_fields(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_a_bad_sha256_is_not_echoed():
    with pytest.raises(ValueError) as info:
        TokenEntry(name="alice", sha256="alice-token")
    assert "alice-token" not in str(info.value) and str(info.value).endswith("got a string of 11 characters")


def test_model_finds_a_model_by_name():
    config = ServiceConfig(models=(ModelEntry("a", "/x"), ModelEntry("b", "/y")), tokens=())
    assert config.model("b") == ModelEntry("b", "/y")
    with pytest.raises(KeyError) as info:
        config.model("c")
    assert info.value.args == ("no model 'c'; the service hosts a, b",)


def test_hash_token_is_the_hex_sha256():
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_new_tokens_are_random_and_url_safe():
    first, second = new_token(), new_token()
    assert first != second and re.fullmatch(r"[A-Za-z0-9_-]{43}", first) and re.fullmatch(r"[A-Za-z0-9_-]{43}", second)
