"""ToyTransformer: a small causal transformer written directly with hook points.

It needs no checkpoint and no transformers: the hook core's tests, the hook-overhead
benchmark and quick experiments use it. Its hook names follow the canonical names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardlens.hooks.hook_point import HookPoint
from shardlens.hooks.root_module import HookedRootModule


class ToyAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z"):
            setattr(self, name, HookPoint())

    def forward(self, x: Tensor) -> Tensor:
        batch, pos, _ = x.shape
        q, k, v = self.qkv(x).view(batch, pos, 3, self.n_heads, self.d_head).unbind(2)  # [batch, pos, head, d_head]
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)  # [batch, head, q_pos, k_pos]
        causal = torch.ones(pos, pos, dtype=torch.bool, device=x.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))  # [batch, pos, head, d_head]
        return self.out(z.reshape(batch, pos, -1))


class ToyMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_mlp), nn.Linear(d_mlp, d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.hook_post(F.gelu(self.hook_pre(self.up(x)))))


class ToyBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.mlp = ToyAttention(d_model, n_heads), ToyMLP(d_model, d_mlp)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, resid: Tensor) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid))))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class ToyTransformer(HookedRootModule):
    """A pre-norm causal transformer with learned positions and canonical hook names.

    Example:
        >>> model = ToyTransformer(n_layers=2)
        >>> logits, cache = model.run_with_cache(torch.zeros(1, 5, dtype=torch.long))
    """

    def __init__(self, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_vocab: int = 50, n_ctx: int = 64):
        super().__init__()
        self.embed, self.pos_embed = nn.Embedding(d_vocab, d_model), nn.Embedding(n_ctx, d_model)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(ToyBlock(d_model, n_heads, 4 * d_model) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, d_vocab)
        self.hook_logits = HookPoint()
        self.setup()

    def forward(self, tokens: Tensor, return_type: str = "logits") -> Tensor:
        """Logits [batch, pos, vocab], or with return_type="loss" the mean next-token loss."""
        if return_type not in ("logits", "loss"):
            raise ValueError(f"return_type must be 'logits' or 'loss'; got {return_type!r}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        pos_embed = self.pos_embed(positions).expand(tokens.shape[0], -1, -1)  # [batch, pos, d_model]
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(pos_embed)
        for block in self.blocks:
            resid = block(resid)
        logits = self.hook_logits(self.unembed(self.ln_final(resid)))
        if return_type == "logits":
            return logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer with ids for "<pad>", "<eos>", "<unk>", "w0", "w1", ….

    Tiny random models need a tokenizer too (for text input, and for tools that insist on
    one); this one is built in memory, no download.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 4:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for words after 3 special tokens")
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
