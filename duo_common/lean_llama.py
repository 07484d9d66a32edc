"""A leaner forward pass for Llama-shaped models on the packed CPU runtime.

Once the matrix products are cheap (``packed_linear``), most of the rest of a CPU forward pass over a few
tokens is transformers' own machinery: thirteen module calls per layer, three projections where one would
do, 30-40 small torch calls for norms, rotary embedding, attention and activation. This forward pass runs
the same computation with less of it: the query, key and value projections are one packed product (and
the gate and up projections another) whose outputs are split, and the layers are walked in a plain loop.
Between the products, for one sequence (the services' case), each operation is one C call
(``decoder_ops``: row by row, so results stay batch-invariant and a tree node's logits are exactly those of
its path run alone); otherwise transformers' own norm, rotary and activation code runs, and the logits are
then bit for bit those of transformers' modules on the packed layers (``tests/test_cpu_runtime.py``,
``tests/test_decoder_ops.py``).
"""

from __future__ import annotations

import types
from collections import Counter

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from duo.common import decoder_ops
from duo.common.kv_cache import GrowableLayer, new_cache
from duo.common.packed_linear import PackedLinear

# The output's field for the cache: ``cache`` from transformers 5.24 on (``past_key_values`` there is deprecated
# and logs a warning), ``past_key_values`` before.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _fused(linears: list[nn.Linear]) -> PackedLinear:
    """One packed layer computing the outputs of ``linears`` side by side."""
    fused = nn.Linear(linears[0].in_features, sum(linear.out_features for linear in linears),
                      bias=linears[0].bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([linear.bias for linear in linears]))
    return PackedLinear(fused)


class _Layer:
    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        self.attention = attention
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fused([attention.q_proj, attention.k_proj, attention.v_proj])
        self.split = (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features)
        self.heads = attention.q_proj.out_features // attention.head_dim
        self.kv_heads = attention.k_proj.out_features // attention.head_dim
        self.o_proj = PackedLinear(attention.o_proj)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.out_features
        self.act = mlp.act_fn
        self.down = PackedLinear(mlp.down_proj)
        self.definition = None  # the layer as one C call (``decoder_ops.run_layer``), where it can run

    def define_for_c(self) -> None:
        attention = self.attention
        self.definition = decoder_ops.layer_definition(
            self.qkv, self.o_proj, self.gate_up, self.down, self.input_norm.weight.detach(),
            self.input_norm.variance_epsilon, self.post_norm.weight.detach(), self.post_norm.variance_epsilon,
            self.heads, self.kv_heads, attention.head_dim, attention.scaling)


def supports_lean_forward(model: nn.Module) -> bool:
    """A Llama causal LM with plain float32 linear layers (checked before packing)."""
    inner = getattr(model, "model", None)
    if getattr(model.config, "model_type", None) != "llama" or inner is None or type(model.lm_head) is not nn.Linear:
        return False
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return all(all(type(getattr(layer.self_attn, n, None)) is nn.Linear for n in names)
               and all(type(getattr(layer.mlp, n, None)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj"))
               for layer in inner.layers)


def install_lean_forward(model: nn.Module, attention) -> Counter:
    """Give ``model`` the lean forward pass (its linear layers packed, fused where they share an input);
    ``attention`` is the attention function (transformers' signature). Returns how many packed products
    got each storage format."""
    layers = [_Layer(layer) for layer in model.model.layers]
    for layer in model.model.layers:  # the fused copies replace them; free the float32 originals
        for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(owner, name, nn.Identity())
    model.lm_head = PackedLinear(model.lm_head)
    model._duo_lean = (layers, attention)
    model._duo_decoder_ops = _decoder_ops_fit(model, layers)
    if model._duo_decoder_ops and decoder_ops.can_run_layers():
        for layer in layers:
            layer.define_for_c()
    model.forward = types.MethodType(_lean_forward, model)
    products = [model.lm_head] + [p for layer in layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    return Counter(product.weight_format.format_name for product in products)


def _decoder_ops_fit(model: nn.Module, layers: list[_Layer]) -> bool:
    """The C decoder operations compute these layers: built here, RMSNorms, SiLU gating, head sizes a multiple
    of 8."""
    norms = [model.model.norm] + [n for layer in layers for n in (layer.input_norm, layer.post_norm)]
    return (decoder_ops.available() and all(type(n) is LlamaRMSNorm for n in norms)
            and all(isinstance(layer.act, (nn.SiLU, SiLUActivation)) and layer.attention.head_dim % 8 == 0
                    for layer in layers))


def _lean_forward(model, input_ids: torch.Tensor, past_key_values=None, cache=None, use_cache: bool = True,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  logits_to_keep: int = 0) -> CausalLMOutputWithPast:
    inner = model.model
    cache = cache if cache is not None else past_key_values
    if cache is None:
        cache = new_cache(model.config)
    if attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError("the lean forward pass takes a 4D attention mask (or none: causal)")
    batch, length = input_ids.shape
    past = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(past, past + length, device=input_ids.device)[None].expand(batch, -1)
    hidden = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
    if _decoder_ops_apply(model, batch, attention_mask):
        hidden = _layers_with_decoder_ops(model, hidden[0], cos[0].contiguous(), sin[0].contiguous(), cache, past,
                                          attention_mask, logits_to_keep)[None]
    else:
        hidden = _layers_with_torch(model, hidden, cos, sin, cache, attention_mask, logits_to_keep)
    return CausalLMOutputWithPast(logits=model.lm_head(hidden), **{_OUTPUT_CACHE_FIELD: cache})


def _decoder_ops_apply(model, batch: int, attention_mask: torch.Tensor | None) -> bool:
    """Whether this call can run the C decoder operations: one sequence, one mask for all heads, and a
    model whose layers are what they compute (checked once, at install)."""
    return model._duo_decoder_ops and batch == 1 and (attention_mask is None or attention_mask.shape[:2] == (1, 1))


def _layers_with_torch(model, hidden, cos, sin, cache, attention_mask, logits_to_keep):
    """The decoder layers and final norm through transformers' own norm, rotary and activation code."""
    layers, attention = model._duo_lean
    batch, length = hidden.shape[:2]
    for index, layer in enumerate(layers):
        head_dim = layer.attention.head_dim
        q, k, v = layer.qkv(layer.input_norm(hidden)).split(layer.split, dim=-1)
        q = q.view(batch, length, -1, head_dim).transpose(1, 2)
        k = k.view(batch, length, -1, head_dim).transpose(1, 2)
        v = v.view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, index)
        out, _ = attention(layer.attention, q, k, v, attention_mask, scaling=layer.attention.scaling)
        hidden = hidden + layer.o_proj(out.reshape(batch, length, -1))
        gate, up = layer.gate_up(layer.post_norm(hidden)).split(layer.intermediate, dim=-1)
        hidden = hidden + layer.down(layer.act(gate) * up)
    hidden = model.model.norm(hidden)
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden


def _layers_with_decoder_ops(model, hidden, cos, sin, cache, past: int, attention_mask, logits_to_keep):
    """The same layers for one sequence (hidden [length, hidden size]) in C (``decoder_ops``): for queries of
    up to SHORT_QUERY_TOKENS (proposals, decoding steps) each whole layer one call, writing its keys and
    values into the cache's buffers; else the operations between the packed products one call each, with
    longer queries (prefills) attended by the model's attention function, which hands them to SDPA. Both
    compute the same numbers."""
    layers, attention = model._duo_lean
    length = hidden.shape[0]
    mask = None
    if attention_mask is not None and length <= decoder_ops.SHORT_QUERY_TOKENS:
        mask = decoder_ops.additive_mask(attention_mask[0, 0, :, :past + length])
    whole_layers = length <= decoder_ops.SHORT_QUERY_TOKENS and layers[0].definition is not None \
        and all(type(layer_cache) is GrowableLayer for layer_cache in cache.layers)
    if whole_layers:
        _whole_layers(layers, hidden, cos, sin, [(cache, past, length, mask)])
    else:  # the operations between the products one call each
        for index, layer in enumerate(layers):
            self_attention = layer.attention
            heads, kv_heads = layer.heads, layer.kv_heads
            qkv = layer.qkv(decoder_ops.rms_norm(hidden, layer.input_norm.weight, layer.input_norm.variance_epsilon))
            q, k, v = decoder_ops.rotary_split(qkv, heads, kv_heads, self_attention.head_dim, cos, sin)
            keys, values = cache.update(k[None], v[None], index)
            if length <= decoder_ops.SHORT_QUERY_TOKENS:
                out = decoder_ops.attention(q, keys[0], values[0], mask, self_attention.scaling)
            else:
                out, _ = attention(self_attention, q.transpose(0, 1)[None], keys, values, attention_mask,
                                   scaling=self_attention.scaling)
                out = out.reshape(length, -1)
            hidden = hidden + layer.o_proj(out)
            normed = decoder_ops.rms_norm(hidden, layer.post_norm.weight, layer.post_norm.variance_epsilon)
            hidden = hidden + layer.down(decoder_ops.silu_mul(layer.gate_up(normed)))
    if logits_to_keep:
        hidden = hidden[-logits_to_keep:].contiguous()
    norm = model.model.norm
    return decoder_ops.rms_norm(hidden, norm.weight, norm.variance_epsilon)


def _whole_layers(layers: list[_Layer], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  sequences: list[tuple]) -> None:
    """Every layer as one C call (``decoder_ops.run_layer``) over hidden [rows, hidden size], in place: the
    rows are those of ``sequences``, (cache, past, rows, mask) each, in order; each layer writes every
    sequence's new keys and values straight into its cache's buffers."""
    for index, layer in enumerate(layers):
        segments = []
        for cache, past, rows, mask in sequences:
            shape = hidden.new_empty(1, layer.kv_heads, rows, layer.attention.head_dim)
            keys, values = cache.layers[index].room_for(shape, shape)
            segments.append(decoder_ops.Segment(rows, keys[0], values[0], past, mask))
        decoder_ops.run_layer(layer.definition, hidden, cos, sin, segments)
        for cache, past, rows, _ in sequences:
            cache.layers[index].filled_to(past + rows)


def runs_sequences_together(model: nn.Module) -> bool:
    """Whether ``forward_sequences`` can run several sequences in one pass on this model: the lean forward
    with whole layers in C."""
    lean = getattr(model, "_duo_lean", None)
    return bool(lean and model._duo_decoder_ops and lean[0][0].definition is not None)


@torch.inference_mode()
def forward_sequences(model: nn.Module, sequences: list) -> list[torch.Tensor]:
    """One pass over the new tokens of several sequences, each with its own KV cache (``sequences``: the
    ``batched_forward.NewTokens`` of each, at most SHORT_QUERY_TOKENS tokens over a ``new_cache``). The norms
    and products run over all rows at once and attention per sequence over its own cache, so each sequence's
    logits are bit for bit those of a pass over it alone. Returns each sequence's kept logits."""
    if any(len(s.token_ids) > decoder_ops.SHORT_QUERY_TOKENS
           or any(type(layer) is not GrowableLayer for layer in s.cache.layers) for s in sequences):
        raise ValueError("forward_sequences takes up to SHORT_QUERY_TOKENS tokens per sequence over a new_cache")
    inner = model.model
    layers, _ = model._duo_lean
    pasts = [s.cache.get_seq_length() for s in sequences]
    hidden = inner.embed_tokens(torch.tensor([t for s in sequences for t in s.token_ids]))
    tables = [inner.rotary_emb(hidden[None, :1], position_ids=s.position_ids(past)[None])
              for s, past in zip(sequences, pasts)]
    cos = torch.cat([cos[0] for cos, _ in tables]).contiguous()
    sin = torch.cat([sin[0] for _, sin in tables]).contiguous()
    _whole_layers(layers, hidden, cos, sin, [
        (s.cache, past, len(s.token_ids), None if s.visible is None else decoder_ops.additive_mask(s.visible))
        for s, past in zip(sequences, pasts)])
    kept, end = [], 0
    for s in sequences:
        end += len(s.token_ids)
        kept.append(torch.arange(end - s.kept_logits, end))
    norm = inner.norm
    rows = torch.cat(kept)
    logits = model.lm_head(decoder_ops.rms_norm(hidden[rows].contiguous(), norm.weight, norm.variance_epsilon))
    return list(logits.split([s.kept_logits for s in sequences]))
