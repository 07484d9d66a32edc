"""A leaner forward pass for Llama-shaped models on the packed CPU runtime.

Once the matrix products are cheap (``packed_linear``), about half of a CPU forward pass over a few tokens
is transformers' own machinery: thirteen module calls per layer, three projections where one would do,
mask construction, keyword plumbing. This forward pass runs the same computation with less of it: the
query, key and value projections are one packed product (and the gate and up projections another) whose
outputs are split, and the layers are walked in a plain loop calling transformers' own norm, rotary and
activation code. Each output of a fused product is computed exactly as in the separate one (the kernel's
outputs are independent of the other columns), so the logits are the ones the packed model computes
through transformers' modules, bit for bit (``tests/test_cpu_runtime.py``).
"""

from __future__ import annotations

import types
from collections import Counter

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from duo_common.kv_cache import new_cache
from duo_common.packed_linear import PackedLinear


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
        self.o_proj = PackedLinear(attention.o_proj)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.out_features
        self.act = mlp.act_fn
        self.down = PackedLinear(mlp.down_proj)


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
    model.forward = types.MethodType(_lean_forward, model)
    products = [model.lm_head] + [p for layer in layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    return Counter(product.weight_format.format_name for product in products)


def _lean_forward(model, input_ids: torch.Tensor, past_key_values=None, cache=None, use_cache: bool = True,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  logits_to_keep: int = 0) -> CausalLMOutputWithPast:
    layers, attention = model._duo_lean
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
    hidden = inner.norm(hidden)
    if logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    return CausalLMOutputWithPast(logits=model.lm_head(hidden), past_key_values=cache)
