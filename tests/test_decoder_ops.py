"""The C operations between a decoder layer's products (duo.common.decoder_ops) compute what transformers'
Llama code computes, each row from that row alone; the lean forward pass built on them keeps trees exact
and greedy output unchanged."""

from __future__ import annotations

import platform

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm, apply_rotary_pos_emb, eager_attention_forward,
)

from duo.common import decoder_ops
from duo.common.cpu_runtime import apply_cpu_runtime
from duo.common.kv_cache import new_cache
from duo.common.packed_linear import kernel_unavailable_reason
from duo.common.tree import TokenTree
from duo.common.tree_attention import sequential_logits, tree_logits
from tests.test_cpu_runtime import cpu_flags, greedy
from tests.tiny_models import build_model

needs_ops = pytest.mark.skipif(not decoder_ops.available(), reason="duo.common._decoder_ops not built or no AVX2")


def test_decoder_ops_are_built_where_they_can_run():
    """The extension is optional at install; on an x86-64 Linux CPU with AVX2 it must be there, so the tests
    below never skip where they should run."""
    can_run = platform.system() == "Linux" and platform.machine() == "x86_64" and "avx2" in cpu_flags()
    assert decoder_ops.available() == can_run


@needs_ops
def test_rms_norm_is_transformers_norm_row_by_row():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96)
    x = torch.randn(7, 96) * 3
    got = decoder_ops.rms_norm(x, norm.weight.data, norm.variance_epsilon)
    torch.testing.assert_close(got, norm(x).detach(), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(decoder_ops.rms_norm(x[r:r + 1], norm.weight.data, 1e-5)[0], got[r]) for r in range(7))


@needs_ops
def test_rotary_split_rotates_exactly_as_transformers():
    torch.manual_seed(0)
    rows, heads, kv_heads, d = 5, 6, 2, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)
    angles = torch.rand(rows, d // 2) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = decoder_ops.rotary_split(qkv, heads, kv_heads, d, cos, sin)
    q_ref, k_ref, v_ref = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref = q_ref.view(1, rows, heads, d).transpose(1, 2)
    k_ref = k_ref.view(1, rows, kv_heads, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos[None], sin[None])
    assert torch.equal(q, q_ref[0].transpose(0, 1))  # elementwise products and sums round as torch's do
    assert torch.equal(k, k_ref[0])
    assert torch.equal(v, v_ref.view(rows, kv_heads, d).transpose(0, 1))


def reference_attention(q, keys, values, mask, scale):
    """transformers' eager attention: q [rows, heads, d], keys/values [kv_heads, kv, d], additive mask."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = q.shape[1] // keys.shape[0], False
    out, _ = eager_attention_forward(module, q.transpose(0, 1)[None], keys[None], values[None],
                                     None if mask is None else mask[None, None], scaling=scale)
    return out[0].reshape(q.shape[0], -1)


@needs_ops
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 8), (9, 3, 64), (6, 2, 40)])
def test_attention_matches_eager_attention(heads, kv_heads, d):
    torch.manual_seed(heads)
    rows, past = 5, 11
    kv = past + rows
    buffer = torch.randn(2, kv_heads, kv + 7, d)  # a cache buffer with room after the filled positions
    keys, values = buffer[0, :, :kv], buffer[1, :, :kv]
    q = torch.randn(rows, heads, d)
    causal = torch.ones(rows, kv, dtype=torch.bool).tril(past)
    causal_additive = torch.zeros(rows, kv).masked_fill(~causal, torch.finfo(torch.float32).min)
    expected = reference_attention(q, keys.contiguous(), values.contiguous(), causal_additive, d ** -0.5)
    for mask in (None, causal_additive, decoder_ops.additive_mask(causal)):
        got = decoder_ops.attention(q, keys, values, mask, d ** -0.5)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tree = causal.clone()
    tree[3, past + 1] = tree[4, past + 2] = False  # tree rows do not see their siblings
    tree_additive = decoder_ops.additive_mask(tree)
    got = decoder_ops.attention(q, keys, values, tree_additive, d ** -0.5)
    expected = reference_attention(q, keys.contiguous(), values.contiguous(), tree_additive, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_ops
def test_attention_of_a_row_does_not_depend_on_the_other_rows():
    torch.manual_seed(1)
    rows, past, heads, kv_heads, d = 6, 20, 9, 3, 64
    keys, values = torch.randn(kv_heads, past + rows, d), torch.randn(kv_heads, past + rows, d)
    q = torch.randn(rows, heads, d)
    together = decoder_ops.attention(q, keys, values, None, 0.125)
    for r in range(rows):
        visible = past + r + 1  # alone: the cache as it was when this row was the newest
        alone = decoder_ops.attention(q[r:r + 1], keys[:, :visible], values[:, :visible], None, 0.125)
        assert torch.equal(alone[0], together[r])


@needs_ops
def test_silu_mul_is_the_gated_activation():
    torch.manual_seed(0)
    gate_up = torch.randn(4, 2 * 48) * 4
    gate, up = gate_up.split(48, dim=-1)
    torch.testing.assert_close(decoder_ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               rtol=1e-6, atol=1e-6)


@needs_ops
def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        decoder_ops.rms_norm(torch.randn(4, 8).t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        decoder_ops.rotary_split(torch.randn(2, 40), 2, 1, 8, torch.ones(2, 8), torch.ones(2, 8))
    with pytest.raises(ValueError, match="multiple of 8"):
        decoder_ops.attention(torch.randn(1, 2, 6), torch.randn(1, 3, 6), torch.randn(1, 3, 6), None, 1.0)
    with pytest.raises(ValueError, match="mask"):
        decoder_ops.attention(torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.zeros(2, 3), 1.0)


needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None,
                                  reason=f"packed kernel: {kernel_unavailable_reason()}")


@needs_ops
@needs_kernel
def test_the_lean_forward_on_decoder_ops_keeps_trees_exact_and_greedy_output_unchanged():
    """A tree pass gives each node exactly the logits of its path run alone; a chain pass exactly those of
    one token at a time; greedy decoding equals transformers' float32 model."""
    model = build_model("llama")
    runtime = apply_cpu_runtime(model, "packed")
    assert runtime.lean_forward and runtime.decoder_ops and model._duo_decoder_ops
    assert "lean Llama forward with C decoder operations" in runtime.describe()
    tree = TokenTree((11, 12, 13, 14, 15, 16), (-1, -1, 0, 0, 2, 1))
    prefix = [1, 5, 9, 20, 33]
    assert torch.equal(tree_logits(model, prefix, tree), sequential_logits(model, prefix, tree))
    with torch.inference_mode():
        cache = new_cache(model.config)
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        chain = model(input_ids=torch.tensor([[7, 8, 9]]), past_key_values=cache, use_cache=True).logits
        cache.crop(-3)
        steps = [model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits for t in (7, 8, 9)]
    assert torch.equal(torch.cat(steps, dim=1), chain)
    reference = build_model("llama")
    assert greedy(model, prefix, 40, new_cache) == greedy(reference, prefix, 40, lambda c: DynamicCache(config=c))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=torch.tensor([prefix])).logits,
                                   reference(input_ids=torch.tensor([prefix])).logits, rtol=1e-4, atol=1e-4)


@needs_ops
@needs_kernel
def test_a_layer_in_one_call_computes_what_the_single_operations_compute():
    """run_layer is the same steps as the per-operation path: the same logits bit for bit, for chains and trees."""
    model = build_model("llama")
    apply_cpu_runtime(model, "packed")
    layers = model._duo_lean[0]
    assert all(layer.definition is not None for layer in layers)
    tree = TokenTree((11, 12, 13, 14, 15, 16), (-1, -1, 0, 0, 2, 1))
    prefix = [1, 5, 9, 20, 33]
    whole = tree_logits(model, prefix, tree), greedy(model, prefix, 30, new_cache)
    definitions = [layer.definition for layer in layers]
    for layer in layers:
        layer.definition = None
    one_by_one = tree_logits(model, prefix, tree), greedy(model, prefix, 30, new_cache)
    for layer, definition in zip(layers, definitions):
        layer.definition = definition
    assert torch.equal(whole[0], one_by_one[0]) and whole[1] == one_by_one[1]
