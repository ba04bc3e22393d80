"""Independent references for tests: a forward pass of ToyTransformer from its weights with
plain torch ops, and gradients by plain autograd.

toy_reference shares no code with the model or the hook core, so cached activations can be
checked against it; grad_through_leaf uses one plain forward hook and torch.autograd, none
of the backward hook machinery, so cached gradients can be checked against it.
"""

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def toy_reference(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation ToyTransformer exposes, by canonical hook name."""
    acts = {}
    batch, pos = tokens.shape
    acts["hook_embed"] = model.embed.weight[tokens]
    acts["hook_pos_embed"] = model.pos_embed.weight[:pos].expand(batch, pos, -1)
    resid = acts["hook_embed"] + acts["hook_pos_embed"]
    for layer, block in enumerate(model.blocks):
        p = f"blocks.{layer}."
        acts[p + "hook_resid_pre"] = resid
        x = F.layer_norm(resid, resid.shape[-1:], block.ln1.weight, block.ln1.bias, block.ln1.eps)
        n_heads, d_head = block.attn.n_heads, block.attn.d_head
        qkv = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = (qkv[..., i * n_heads * d_head:(i + 1) * n_heads * d_head].reshape(batch, pos, n_heads, d_head) for i in range(3))
        scores = torch.zeros(batch, n_heads, pos, pos)
        for h in range(n_heads):
            scores[:, h] = q[:, :, h] @ k[:, :, h].transpose(-1, -2) / math.sqrt(d_head)
        future = torch.triu(torch.ones(pos, pos, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        pattern = torch.softmax(scores, dim=-1)
        z = torch.stack([pattern[:, h] @ v[:, :, h] for h in range(n_heads)], dim=2)
        acts.update({p + "attn.hook_q": q, p + "attn.hook_k": k, p + "attn.hook_v": v,
                     p + "attn.hook_attn_scores": scores, p + "attn.hook_pattern": pattern, p + "attn.hook_z": z})
        attn_out = z.reshape(batch, pos, -1) @ block.attn.out.weight.T + block.attn.out.bias
        acts[p + "hook_attn_out"] = attn_out
        resid = resid + attn_out
        acts[p + "hook_resid_mid"] = resid
        x = F.layer_norm(resid, resid.shape[-1:], block.ln2.weight, block.ln2.bias, block.ln2.eps)
        pre = x @ block.mlp.up.weight.T + block.mlp.up.bias
        post = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
        mlp_out = post @ block.mlp.down.weight.T + block.mlp.down.bias
        acts.update({p + "mlp.hook_pre": pre, p + "mlp.hook_post": post, p + "hook_mlp_out": mlp_out})
        resid = resid + mlp_out
        acts[p + "hook_resid_post"] = resid
    x = F.layer_norm(resid, resid.shape[-1:], model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
    acts["hook_logits"] = x @ model.unembed.weight.T + model.unembed.bias
    return acts


def logits_from_resid(model, resid: torch.Tensor) -> torch.Tensor:
    """The logits the final norm and unembedding give for a final residual stream."""
    x = F.layer_norm(resid, resid.shape[-1:], model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
    return x @ model.unembed.weight.T + model.unembed.bias


def grad_through_leaf(
    model, name: str, run: Callable[[], torch.Tensor], *, fwd_hooks: Sequence = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation at `name` and d run() / d activation, by plain autograd.

    A forward hook replaces the activation with a fresh leaf tensor, and torch.autograd.grad
    differentiates the scalar `run()` returns with respect to it. The leaf cuts the graph
    above the hook point, so take one name per run.

    Args:
        run: one forward of `model`, returning a scalar (a loss or a metric).
        fwd_hooks: hooks to run before the leaf is made (on `name` too, if it is among them).

    Returns:
        (activation, gradient), both detached, each shaped like the activation.
    """
    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().clone().requires_grad_(True)
        return leaf["x"]

    with model.hooks(fwd_hooks=[*fwd_hooks, (name, make_leaf)]):
        value = run()
    (grad,) = torch.autograd.grad(value, leaf["x"])
    return leaf["x"].detach(), grad
