"""The scripts in examples/ print and write what they should, and the demo model's training
is deterministic."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shardlens.hooks.toy import ToyTransformer
from tests.hooks.reference import toy_reference

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def loss_without_head(model, tokens, layer: int, head: int) -> float:
    """The next-token loss with one head's output zeroed, by a plain torch pre-hook on the
    block's output projection (no hook point involved)."""
    attn = model.blocks[layer].attn

    def zero_head(module, inputs):  # inputs[0]: [batch, pos, head * d_head]
        z = inputs[0].clone()
        d_head = z.shape[-1] // attn.n_heads
        z[..., head * d_head:(head + 1) * d_head] = 0
        return (z,)

    handle = attn.out.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            return next_token_loss(model(tokens), tokens)
    finally:
        handle.remove()


def test_ablate_heads_prints_each_heads_loss():
    lines = run_example(str(EXAMPLES / "ablate_heads.py")).splitlines()
    torch.manual_seed(0)  # the script's model and tokens, from its seed
    model = ToyTransformer(n_layers=2, d_model=32, n_heads=4).eval()
    tokens = torch.randint(0, 50, (4, 16))
    with torch.no_grad():
        base = next_token_loss(toy_reference(model, tokens)["hook_logits"], tokens)
    clean = re.fullmatch(r"clean loss (\d+\.\d{4})", lines[0])
    assert clean and float(clean[1]) == pytest.approx(base, abs=1e-4), lines[0]
    cells = [(layer, head) for layer in range(2) for head in range(4)]
    assert len(lines) == 1 + len(cells)
    for line, (layer, head) in zip(lines[1:], cells):
        match = re.fullmatch(rf"L{layer}H{head}: loss (\d+\.\d{{4}}) \(([+-]\d+\.\d{{4}})\)", line)
        assert match, line
        expected = loss_without_head(model, tokens, layer, head)
        assert float(match[1]) == pytest.approx(expected, abs=1e-4), line
        assert float(match[2]) == pytest.approx(expected - base, abs=1e-4), line


def test_training_the_demo_model_is_deterministic_and_learns(capsys):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_induction
    finally:
        sys.path.remove(str(EXAMPLES))
    first, loss = train_induction.train(steps=120)
    second, _ = train_induction.train(steps=120)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert loss < 0.1  # induction has formed (the shipped model trains 300 steps, to about 0.002)
    for layer in first.model.layers:
        assert torch.count_nonzero(layer.mlp.down_proj.weight) == 0  # attention-only
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed] == ["0", "50", "100", "119"] * 2
    assert printed[-1] == f"step  119  second-half loss {loss:.4f}"


def test_train_induction_writes_the_shipped_demo_model(tmp_path):
    out = run_example(str(EXAMPLES / "train_induction.py"), "--out", str(tmp_path))
    lines = out.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["0", "50", "100", "150", "200", "250", "299"]
    assert float(lines[-2].split()[-1]) < 0.05 and lines[-1] == f"saved to {tmp_path}"
    shipped = ROOT / "shardlens" / "data" / "induction"
    written, expected = load_file(tmp_path / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert written.keys() == expected.keys()
    for name in expected:  # one thread and fixed seeds: the very weights that ship
        assert torch.equal(written[name], expected[name]), name
    assert (tmp_path / "tokenizer.json").read_text() == (shipped / "tokenizer.json").read_text()
