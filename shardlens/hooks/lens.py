"""What TransformerLens' analysis code reads from a model besides its hooks: `cfg`, the
token helpers and the weight matrices in TransformerLens' shapes.

`transformer_lens.patching`, `head_detector` and the like read `model.cfg` (n_layers,
n_heads, d_model, device, ...), call `to_str_tokens` / `to_single_token`, and take weights
such as `model.W_U` or `model.W_O[layer]`. Here they are built from a Hugging Face model
and its shardlens architecture:

- `LensConfig` / `lens_config`: TransformerLens' config fields, as a frozen value.
- `str_tokens` / `single_token`: TransformerLens' token helpers over a HF tokenizer.
- `WeightViews`: a mixin giving a model with `.model` (the HF model), `.architecture` and
  `.config` (its text config) the stacked weights W_E, W_pos, W_Q, W_K, W_V, W_O, b_Q, b_K,
  b_V, b_O, W_in, W_gate, W_out, b_in, b_out, W_U, b_U.

The weights are the HF modules' own, unprocessed: no LayerNorm folding, no centring, no
embedding scale (Gemma multiplies hook_embed by sqrt(d_model) inside its embedding module;
W_E is the unscaled table). So `ln1`'s output (not `ln1.hook_normalized`, which is before
the norm's weight) times W_Q plus b_Q is the query projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.hooks.architectures import BlockArchitecture, Architecture
from shardlens.hooks.head_inputs import row_blocks
from shardlens.hooks.shapes import canonical_shape
from shardlens.hooks.taps import PointOptions

NORMALIZATION_TYPES = ("LN", "RMS")
POSITIONAL_EMBEDDING_TYPES = ("standard", "rotary")


class WeightViewError(ValueError):
    """A TransformerLens weight that the model's family does not have (W_pos of a rotary
    model, per-layer W_in of a mixture-of-experts model, W_Q of latent attention).

    Not an AttributeError: torch's nn.Module would replace the message by its own "has no
    attribute" when a property raises one.
    """


# ---------------------------------------------------------------------------------- cfg


@dataclass(frozen=True)
class LensConfig:
    """TransformerLens' config fields (HookedTransformerConfig's names) for a shardlens model.

    Sizes are those of the model's hook points: d_head is the size of hook_z's heads (the
    input of W_O), n_key_value_heads that of hook_k's heads (equal to n_heads without
    grouped-query attention, where TransformerLens has None), d_mlp that of mlp.hook_post (in
    a model whose every layer is a mixture of experts, of one expert's). The use_* flags are
    the model's optional hook points (sl.PointOptions) when the config was made.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_key_value_heads: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: Optional[str]
    eps: float
    normalization_type: str  # "LN" (LayerNorm) | "RMS" (RMSNorm)
    positional_embedding_type: str  # "standard" (learned absolute) | "rotary"
    device: str
    dtype: torch.dtype
    final_rms: bool = False
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    attn_only: bool = False
    num_experts: Optional[int] = None
    experts_per_token: Optional[int] = None
    attn_types: Optional[tuple] = None  # per layer "global" | "local" (sliding window), where any slides
    window_size: Optional[int] = None
    attn_scores_soft_cap: float = -1.0  # -1: none (TransformerLens' convention)
    output_logits_soft_cap: float = -1.0
    tie_word_embeddings: bool = False
    original_architecture: Optional[str] = None  # the HF class, e.g. "LlamaForCausalLM"
    model_name: str = ""
    n_devices: int = 1
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_hook_tokens: bool = False

    def __post_init__(self) -> None:
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ValueError(f"normalization_type={self.normalization_type!r}; valid: {NORMALIZATION_TYPES}")
        if self.positional_embedding_type not in POSITIONAL_EMBEDDING_TYPES:
            raise ValueError(f"positional_embedding_type={self.positional_embedding_type!r}; valid: {POSITIONAL_EMBEDDING_TYPES}")
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}")

    @property
    def uses_rms_norm(self) -> bool:
        return self.normalization_type == "RMS"

    def to_dict(self) -> dict:
        return asdict(self)


def lens_config(
    config: Any, architecture: Architecture, *, device: Union[str, torch.device], dtype: torch.dtype,
    n_devices: int = 1, options: PointOptions = PointOptions(),
) -> LensConfig:
    """TransformerLens' config of a model with this HF config and shardlens architecture.

    Args:
        config: the HF model's own config (`model.config`; of a multimodal model, whose
            text config gives the sizes, it names the architecture).
        architecture: the model's architecture (`architecture_for(config)`).
        device: where its embeddings are (where TransformerLens puts results).
        dtype: its parameters' dtype.
        n_devices: how many devices its layers are spread over.
        options: its optional hook points, for the use_* flags.
    """
    hf_class, name = (getattr(config, "architectures", None) or [None])[0], getattr(config, "_name_or_path", "")
    config = config.get_text_config()
    moe = [architecture.block_at(layer).moe for layer in range(config.num_hidden_layers)]
    routed = next((m for m in moe if m is not None), None)
    rms = not architecture.block.norm.startswith("layernorm")
    sliding = [architecture.attention_kind(layer) == "sliding_attention" for layer in range(config.num_hidden_layers)]
    return LensConfig(
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        n_heads=config.num_attention_heads,
        d_head=canonical_shape(config, architecture, "blocks.0.attn.hook_z")[1],
        n_key_value_heads=canonical_shape(config, architecture, "blocks.0.attn.hook_k")[0],
        d_mlp=_d_mlp(config, architecture, moe),
        d_vocab=config.vocab_size,
        d_vocab_out=config.vocab_size,
        n_ctx=config.max_position_embeddings,
        act_fn=_first_set(config, ("hidden_activation", "hidden_act", "activation_function", "activation")),
        eps=float(_first_set(config, ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps")) or 1e-5),
        normalization_type="RMS" if rms else "LN",
        positional_embedding_type="standard" if architecture.pos_embed else "rotary",
        device=str(torch.device(device)),
        dtype=dtype,
        final_rms=rms,
        gated_mlp=any(m is None and architecture.block_at(i).gated for i, m in enumerate(moe)),
        parallel_attn_mlp=architecture.block.parallel,
        num_experts=routed.n_experts if routed else None,
        experts_per_token=routed.top_k if routed else None,
        attn_types=tuple("local" if s else "global" for s in sliding) if any(sliding) else None,
        window_size=getattr(config, "sliding_window", None) if any(sliding) else None,
        attn_scores_soft_cap=float(getattr(config, "attn_logit_softcapping", None) or -1.0),
        output_logits_soft_cap=float(architecture.logit_softcap or -1.0),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        original_architecture=hf_class,
        model_name=name or "",
        n_devices=n_devices,
        use_attn_result=options.attn_result,
        use_split_qkv_input=options.split_qkv_input,
        use_attn_in=options.attn_in,
        use_hook_mlp_in=options.hook_mlp_in,
        use_hook_tokens=options.hook_tokens,
    )


def _first_set(config: Any, names: tuple) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def _d_mlp(config: Any, architecture: Architecture, moe: list) -> int:
    """hook_post's size in the dense layers; one expert's where every layer routes."""
    dense = [layer for layer, m in enumerate(moe) if m is None]
    if dense:
        return canonical_shape(config, architecture, f"blocks.{dense[0]}.mlp.hook_post")[0]
    return canonical_shape(config, architecture, "blocks.0.mlp.experts.0.hook_post")[0]


# ------------------------------------------------------------------------------- tokens


def str_tokens(tokenizer: Any, input: Any, *, prepend_bos: Optional[bool] = None) -> Union[list[str], list[list]]:
    """Each token of `input` as its string, as TransformerLens' to_str_tokens gives them.

    Args:
        tokenizer: a HF tokenizer.
        input: a string (encoded as HookedModel.to_tokens does), token ids as a tensor or
            array of shape [pos] or [1, pos] or a list of ints, or a list of strings or of id
            sequences (one list of strings each).
        prepend_bos: for string input, True / False to put / not put the BOS token first
            (instead of the tokenizer's own special tokens); None: the tokenizer's default.

    Example:
        >>> str_tokens(tokenizer, "The cat")  # ['<s>', 'The', ' cat'] with a Llama tokenizer
    """
    if isinstance(input, list) and input and not all(_is_id(t) for t in input):
        return [str_tokens(tokenizer, item, prepend_bos=prepend_bos) for item in input]
    if isinstance(input, str):
        ids = _encode(tokenizer, input, prepend_bos)
    else:
        ids = _sequence(input)
    # one id per call: decoding them together would merge byte-level pieces
    return tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)


def single_token(tokenizer: Any, text: str) -> int:
    """The id of the one token that `text` is (no special tokens added).

    Raises:
        ValueError: `text` encodes to no token or to more than one.
    """
    ids = _encode(tokenizer, text, prepend_bos=False)
    if len(ids) != 1:
        pieces = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
        raise ValueError(f"{text!r} is not a single token: it encodes to {len(ids)} tokens {pieces} (ids {ids})")
    return ids[0]


def _is_id(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _encode(tokenizer: Any, text: str, prepend_bos: Optional[bool]) -> list[int]:
    if prepend_bos is None:
        return list(tokenizer(text)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not prepend_bos:
        return ids
    if tokenizer.bos_token_id is None:
        raise ValueError(f"prepend_bos=True, but the tokenizer ({type(tokenizer).__name__}) has no BOS token")
    return [tokenizer.bos_token_id] + ids


def _sequence(input: Any) -> list[int]:
    """Token ids of a sequence given as [pos] or [1, pos] (tensor, array or list of ints)."""
    if isinstance(input, list) and not input:
        return []
    try:
        tokens = torch.as_tensor(input)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"input must be text, a list of texts, or token ids; got {type(input).__name__}") from None
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"token ids must be integers; got dtype {tokens.dtype}")
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim > 1:
        raise ValueError(f"token ids must be [pos] or [1, pos]; got shape {tuple(tokens.shape)} (pass one sequence at a time)")
    return tokens.reshape(-1).tolist()


# ------------------------------------------------------------------------------ weights


def in_out(module: nn.Module) -> Tensor:
    """A projection's weight as [in, out]: nn.Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight
    if isinstance(module, nn.Linear):
        return module.weight.T
    raise WeightViewError(f"{type(module).__name__} is neither nn.Linear nor Conv1D: its weight architecture is unknown")


def _bias(module: nn.Module, size: int, like: Tensor) -> Tensor:
    bias = getattr(module, "bias", None)
    return bias if bias is not None else like.new_zeros(size)


class WeightViews:
    """TransformerLens' weight attributes, read from the HF modules (see the module doc).

    For a class that has `model` (the HF causal LM), `architecture` (its Architecture, or None) and
    `config` (its text config), as HookedModel does. Each property builds a new, detached
    tensor from the current weights (W_E, W_pos and W_U are views of the parameters
    themselves: edit the HF modules to change a model, not these). Per-layer weights are
    stacked on the device of layer 0's.

    Shapes, as in TransformerLens' HookedTransformer: W_E [d_vocab, d_model], W_pos [n_ctx,
    d_model], W_Q [n_layers, n_heads, d_model, d_head], W_K / W_V the same (under grouped-query
    attention key/value head g repeated for its n_heads / n_kv query heads, as
    repeat_interleave; _W_K / _W_V / _b_K / _b_V have n_kv heads), W_O [n_layers, n_heads,
    d_head, d_model], b_Q / b_K / b_V [n_layers, n_heads, d_head], b_O [n_layers, d_model],
    W_in / W_gate [n_layers, d_model, d_mlp], W_out [n_layers, d_mlp, d_model], b_in [n_layers,
    d_mlp], b_out [n_layers, d_model], W_U [d_model, d_vocab], b_U [d_vocab]. A bias the
    family does not have is zeros. W_in is the linear (up) projection; gated MLPs' gate
    projection is W_gate (None for ungated MLPs).
    """

    model: nn.Module
    architecture: Optional[Architecture]
    config: Any

    # -------------------------------------------------------------- embeddings, unembedding

    @property
    def W_E(self) -> Tensor:
        return self._module(self._lens_architecture().embed).weight.detach()

    @property
    def W_pos(self) -> Tensor:
        architecture = self._lens_architecture()
        if architecture.pos_embed is None:
            raise WeightViewError(
                f"W_pos is only for learned absolute positions; {self.config.model_type} models have "
                f"{'rotary' if architecture.rotary else 'no'} position embeddings"
            )
        return self._module(architecture.pos_embed).weight.detach()

    @property
    def W_U(self) -> Tensor:
        return in_out(self._module(self._lens_architecture().unembed)).detach()

    @property
    def b_U(self) -> Tensor:
        unembed = self._module(self._lens_architecture().unembed)
        return _bias(unembed, self.config.vocab_size, unembed.weight).detach()

    # ------------------------------------------------------------------------- attention

    @property
    def W_Q(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "q")[0])

    @property
    def b_Q(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "q")[1])

    @property
    def _W_K(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "k")[0])

    @property
    def _b_K(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "k")[1])

    @property
    def _W_V(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "v")[0])

    @property
    def _b_V(self) -> Tensor:
        return self._stack(lambda layer: self._heads(layer, "v")[1])

    @property
    def W_K(self) -> Tensor:
        return self._per_query_head(self._W_K)

    @property
    def b_K(self) -> Tensor:
        return self._per_query_head(self._b_K)

    @property
    def W_V(self) -> Tensor:
        return self._per_query_head(self._W_V)

    @property
    def b_V(self) -> Tensor:
        return self._per_query_head(self._b_V)

    @property
    def W_O(self) -> Tensor:
        n_heads = self.config.num_attention_heads
        # [head * d_head, d_model] -> [head, d_head, d_model]
        return self._stack(lambda layer: in_out(self._block_module(layer, "o_proj")).unflatten(0, (n_heads, -1)))

    @property
    def b_O(self) -> Tensor:
        def bias(layer: int) -> Tensor:
            o_proj = self._block_module(layer, "o_proj")
            return _bias(o_proj, self.config.hidden_size, o_proj.weight)

        return self._stack(bias)

    # ------------------------------------------------------------------------------- MLP

    @property
    def W_in(self) -> Tensor:
        return self._stack(lambda layer: self._mlp_in(layer, "in")[0])

    @property
    def b_in(self) -> Tensor:
        return self._stack(lambda layer: self._mlp_in(layer, "in")[1])

    @property
    def W_gate(self) -> Optional[Tensor]:
        architecture = self._lens_architecture()
        blocks = [architecture.block_at(layer) for layer in range(self.config.num_hidden_layers)]
        if not any(b.gated or b.moe is not None for b in blocks):
            return None  # as TransformerLens: no gate in an ungated MLP
        return self._stack(lambda layer: self._mlp_in(layer, "gate")[0])

    @property
    def W_out(self) -> Tensor:
        return self._stack(lambda layer: in_out(self._block_module(layer, "mlp_out", mlp=True)))

    @property
    def b_out(self) -> Tensor:
        def bias(layer: int) -> Tensor:
            mlp_out = self._block_module(layer, "mlp_out", mlp=True)
            return _bias(mlp_out, self.config.hidden_size, mlp_out.weight)

        return self._stack(bias)

    # --------------------------------------------------------------------------- helpers

    def _lens_architecture(self) -> Architecture:
        if self.architecture is None:
            model_type = getattr(self.config, "model_type", None)
            raise WeightViewError(f"weight views need a registered architecture; model type {model_type!r} has no architecture")
        return self.architecture

    def _module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def _block_module(self, layer: int, field: str, *, mlp: bool = False) -> nn.Module:
        block_architecture = self._lens_architecture().block_at(layer)
        if mlp and block_architecture.moe is not None:
            self._refuse_moe(field)
        return self._module(self._lens_architecture().blocks)[layer].get_submodule(getattr(block_architecture, field))

    def _refuse_moe(self, what: str) -> None:
        architecture = self._lens_architecture()
        routed = [layer for layer in range(self.config.num_hidden_layers) if architecture.block_at(layer).moe is not None]
        raise WeightViewError(
            f"{self.config.model_type} is a mixture-of-experts model (layers {routed} route over experts): "
            f"per-layer MLP weights ({what}) do not apply; read the experts' weights from "
            f"{architecture.blocks}.<layer>.{architecture.block_at(routed[0]).moe.experts}"
        )

    def _stack(self, per_layer: Callable[[int], Tensor]) -> Tensor:
        tensors = [per_layer(layer) for layer in range(self.config.num_hidden_layers)]
        return torch.stack([t.to(tensors[0].device) for t in tensors]).detach()

    def _n_kv(self) -> int:
        return canonical_shape(self.config, self._lens_architecture(), "blocks.0.attn.hook_k")[0]

    def _per_query_head(self, kv: Tensor) -> Tensor:
        """[layer, n_kv, ...] -> [layer, n_heads, ...]: query head h reads kv head h // group."""
        return kv.repeat_interleave(self.config.num_attention_heads // kv.shape[1], dim=1)

    def _heads(self, layer: int, component: str) -> tuple[Tensor, Tensor]:
        """One layer's (weights [head, d_model, d_head], biases [head, d_head]) of q, k or v,
        split out of the projections as the architecture arranges their output rows."""
        block_architecture = self._lens_architecture().block_at(layer)
        if not block_architecture.qkv:
            raise WeightViewError(
                f"{self.config.model_type} attention projects no per-head queries, keys or values from the "
                "residual stream (latent attention goes through shared low-rank latents and norms): W_Q, W_K, W_V "
                "do not apply"
            )
        n_heads, n_kv = self.config.num_attention_heads, self._n_kv()
        block = self._module(self._lens_architecture().blocks)[layer]
        weights: dict[int, Tensor] = {}
        biases: dict[int, Tensor] = {}
        for path, arrangement in block_architecture.qkv:
            projection = block.get_submodule(path)
            owners = row_blocks(arrangement, n_heads, n_kv)
            weight = in_out(projection).T.unflatten(0, (len(owners), -1))  # [block, d_head, d_model]
            bias = _bias(projection, weight.shape[0] * weight.shape[1], weight).unflatten(0, (len(owners), -1))
            for i, (owner, head) in enumerate(owners):
                if owner == component:
                    weights[head], biases[head] = weight[i].T, bias[i]
        count = n_heads if component == "q" else n_kv
        return torch.stack([weights[h] for h in range(count)]), torch.stack([biases[h] for h in range(count)])

    def _mlp_in(self, layer: int, part: str) -> tuple[Tensor, Tensor]:
        """One layer's (weight [d_model, d_mlp], bias [d_mlp]) of the MLP's linear input
        projection ("in") or its gate ("gate")."""
        block_architecture: BlockArchitecture = self._lens_architecture().block_at(layer)
        if block_architecture.moe is not None:
            self._refuse_moe("W_in" if part == "in" else "W_gate")
        mlp_in = self._block_module(layer, "mlp_in")
        weight = in_out(mlp_in)
        bias = _bias(mlp_in, weight.shape[1], weight)
        if block_architecture.fused_gate_up:  # [gate | up] in one projection (Phi-3)
            half = 0 if part == "gate" else 1
            return weight.chunk(2, dim=1)[half], bias.chunk(2)[half]
        if part == "gate" or not block_architecture.gated:
            return weight, bias
        up = self._block_module(layer, "mlp_in_linear")
        up_weight = in_out(up)
        return up_weight, _bias(up, up_weight.shape[1], up_weight)
