"""The CPU runtime (duo.common.cpu_runtime): the packed few-row matrix kernel, grouped-query attention and
the in-place KV cache compute what transformers' own path computes, and choosing them is explicit."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import eager_attention_forward

from duo.common import tree_attention
from duo.common.cpu_runtime import (
    SHORT_QUERY_TOKENS, RuntimeUnavailableError, apply_cpu_runtime, grouped_query_attention,
)
from duo.common.kv_cache import GrowableLayer, new_cache
from duo.common.models import select_cache_positions, truncate_cache
from duo.common.packed_linear import (
    FORMAT_BF16, FORMAT_F32, FORMAT_I8_BLOCKS, PackedLinear, PackedWeight, exact_int8_blocks, instruction_sets,
    kernel_unavailable_reason, pack_weight, to_panels, use_threads,
)
from duo.common.tree import TokenTree
from tests.tiny_models import build_model

needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None,
                                  reason=f"packed kernel: {kernel_unavailable_reason()}")


def cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "") \
        if cpuinfo.exists() else ""
    return set(flags.split(":", 1)[-1].split())


def test_kernel_is_built_where_it_can_run():
    """The extension is optional at install; on an x86-64 Linux CPU with AVX-512 or AVX2 and FMA it must be
    there and pick the best of them, so the kernel tests below never skip where they should run."""
    flags = cpu_flags()
    expected = ([name for name, needs in (("avx512", {"avx512f", "fma"}), ("avx2", {"avx2", "fma"}))
                 if needs <= flags] if platform.system() == "Linux" and platform.machine() == "x86_64" else [])
    assert instruction_sets() == expected
    assert (kernel_unavailable_reason() is None) == bool(expected)


@needs_kernel
def test_an_instruction_set_the_cpu_lacks_is_refused():
    linear = torch.nn.Linear(32, 8)
    with pytest.raises(RuntimeError, match="cannot run sse2"):
        PackedLinear(linear, instruction_set="sse2")
    assert PackedLinear(linear).instruction_set == instruction_sets()[0]


@pytest.mark.skipif(len(instruction_sets()) < 2, reason="needs a CPU with both AVX-512 and AVX2")
@pytest.mark.parametrize("kind", ["float32", "q4_1", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13, 20])
def test_both_instruction_sets_give_the_same_bits(kind, rows):
    """Each output is the same FMA chain whichever kernel computes it: a model's numbers do not depend on
    the CPU generation it runs on."""
    torch.manual_seed(rows)
    weight = {"float32": torch.randn(70, 96), "q4_1": gguf_like_blocks("q4_1", 70, 96),
              "bf16": torch.randn(70, 96).bfloat16().float()}[kind]
    linear = torch.nn.Linear(96, 70)
    linear.weight.data = weight
    x = torch.randn(rows, 96)
    results = [PackedLinear(linear, instruction_set=name)(x) for name in instruction_sets()]
    assert all(torch.equal(result, results[0]) for result in results[1:])


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 6, 7, 13, 14, 15, 16, 29, 40, 100])
@pytest.mark.parametrize("out_features,in_features", [(1, 5), (31, 17), (32, 64), (33, 64), (100, 576)])
def test_packed_linear_matches_torch(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features)
    expected = linear(x).detach()
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["q4_1", "bf16", "float32"])
def test_a_packed_weight_widens_back_to_the_same_bits(kind):
    weights = {"q4_1": gguf_like_blocks("q4_1", 70, 96), "bf16": torch.randn(70, 96).bfloat16().float(),
               "float32": torch.randn(70, 96)}
    assert torch.equal(pack_weight(weights[kind]).widened(70), weights[kind])


@needs_kernel
@pytest.mark.parametrize("kind", ["float32", "q4_1"])
def test_packed_linear_is_batch_invariant(kind):
    """Each row's result is bit-identical whether it is computed alone or with others, wherever it sits
    (also across the switch from widening in registers, up to 12 rows with AVX-512 and 6 with AVX2, to a widened
    panel beyond)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1000)
    if kind == "q4_1":
        linear.weight.data = gguf_like_blocks("q4_1", 1000, 576)
    packed = PackedLinear(linear)
    assert packed.weight_format.format == (FORMAT_F32 if kind == "float32" else FORMAT_I8_BLOCKS)
    x = torch.randn(40, 576)
    together = packed(x)
    for row in (0, 5, 6, 7, 13, 14, 15, 39):
        assert torch.equal(packed(x[row:row + 1])[0], together[row])
    assert torch.equal(packed(x[10:30]), together[10:30])


def gguf_like_blocks(kind: str, rows: int, inputs: int, seed: int = 0) -> torch.Tensor:
    """Weights as llama.cpp's legacy block formats dequantise them: per 32 inputs a float16 scale d (and
    minimum m), values d * q + m computed in float32."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, inputs // 32, 1)
    d = (torch.rand(shape, generator=generator) * 0.02 + 1e-4).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (rows, inputs // 32, 32), generator=generator).float()
        q[..., 0], q[..., 1] = 0, 15  # the block's minimum and maximum quantise to 0 and 15
        m = (torch.randn(shape, generator=generator) * 0.05).half().float()
        return (d * q + m).reshape(rows, inputs)
    if kind == "q8_0":
        q = torch.randint(-127, 128, (rows, inputs // 32, 32), generator=generator).float()
        q[..., 0] = 127 * torch.sign(torch.randn(shape[:2], generator=generator))  # amax quantises to ±127
        return (d * q).reshape(rows, inputs)
    if kind == "q4_0":
        q = torch.randint(-8, 8, (rows, inputs // 32, 32), generator=generator).float()
        q[..., 0] = -8  # the value of largest magnitude quantises to -8
        return (d * q).reshape(rows, inputs)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "q4_0"])
def test_gguf_block_weights_are_found_exactly(kind):
    weight = gguf_like_blocks(kind, 40, 96)
    weight[3, 32:64] = 0.25  # a constant block
    q, scale, offset = exact_int8_blocks(weight)
    rebuilt = (scale[..., None] * q.float().view(40, 3, 32) + offset[..., None]).reshape(40, 96)
    assert torch.equal(rebuilt, weight)
    assert pack_weight(weight).format == FORMAT_I8_BLOCKS


def test_other_weights_keep_an_exact_wider_format():
    torch.manual_seed(0)
    plain = torch.randn(40, 96)
    assert exact_int8_blocks(plain) is None and pack_weight(plain).format == FORMAT_F32
    almost = gguf_like_blocks("q4_1", 40, 96)
    almost[7, 50] = torch.nextafter(almost[7, 50], torch.tensor(1.0))  # one weight one ulp off the grid
    assert exact_int8_blocks(almost) is None
    signed_zero = gguf_like_blocks("q8_0", 40, 96)
    signed_zero[2, 5] = -0.0  # equal to 0.0, but not the same bits as the 0 * scale a block would rebuild
    assert exact_int8_blocks(signed_zero) is None
    assert pack_weight(torch.randn(40, 96).bfloat16().float()).format == FORMAT_BF16
    assert pack_weight(torch.randn(40, 95)).format == FORMAT_F32  # inputs not a multiple of 32


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 6, 7, 12, 13, 16, 25, 33])
def test_compressed_formats_multiply_bit_for_bit_like_float32(kind, rows):
    """The same weights stored compactly give exactly the float32 layout's products: only bytes change."""
    weight = torch.randn(70, 96).bfloat16().float() if kind == "bf16" else gguf_like_blocks(kind, 70, 96)
    linear = torch.nn.Linear(96, 70)
    linear.weight.data = weight
    compact = PackedLinear(linear)
    wide = PackedLinear(linear)
    wide.weight_format = PackedWeight(FORMAT_F32, to_panels(weight))
    assert compact.weight_format.format != FORMAT_F32
    assert compact.weight_format.nbytes < wide.weight_format.nbytes
    x = torch.randn(rows, 96)
    assert torch.equal(compact(x), wide(x))
    torch.testing.assert_close(compact(x), linear(x).detach(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_packed_linear_keeps_leading_dimensions_and_refuses_other_dtypes():
    packed = PackedLinear(torch.nn.Linear(8, 4))
    assert packed(torch.randn(2, 3, 8)).shape == (2, 3, 4)
    assert packed(torch.randn(2, 3, 8).transpose(0, 1)).shape == (3, 2, 4)  # non-contiguous input
    with pytest.raises(TypeError, match="float32"):
        packed(torch.randn(1, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="of 8 features"):
        packed(torch.randn(2, 4))  # as many values as one row of 8, but rows of 4
    with pytest.raises(ValueError, match="float32"):
        PackedLinear(torch.nn.Linear(8, 4).to(torch.bfloat16))


def greedy(model, prompt: list[int], steps: int, cache_factory) -> list[int]:
    """Greedy decoding one token per forward, through a cache from ``cache_factory``."""
    cache = cache_factory(model.config)
    tokens, out = list(prompt), []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits
    return out


@needs_kernel
def test_packed_runtime_computes_the_same_model():
    reference = build_model("llama")
    packed = build_model("llama")
    runtime = apply_cpu_runtime(packed, "packed")
    assert runtime.kernels == "packed" and runtime.lean_forward
    assert runtime.packed_layers == 2 * 4 + 1  # per layer: q|k|v, o, gate|up, down; and the output layer
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    ids = torch.tensor([[1, 5, 9, 20, 33, 41, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    prompt = [1, 5, 9, 20]
    assert greedy(packed, prompt, 40, new_cache) == greedy(reference, prompt, 40, lambda c: DynamicCache(config=c))


@needs_kernel
def test_lean_forward_gives_the_packed_modules_logits_bit_for_bit():
    """Fused projections and the plain layer loop change nothing: chains, trees (4D mask and positions),
    the last position only, and a call without a cache all equal transformers' modules on packed layers
    (with transformers' own operations between the products; the C ones are tests/test_decoder_ops.py's)."""
    from duo.common.cpu_runtime import _use_grouped_query_attention
    from duo.common.packed_linear import pack_linear_layers
    from duo.common.tree_attention import tree_attention_inputs

    modules = build_model("llama")
    _use_grouped_query_attention(modules)
    pack_linear_layers(modules)
    lean = build_model("llama")
    assert apply_cpu_runtime(lean, "packed").lean_forward
    lean._duo_decoder_ops = False
    prompt, chain = torch.tensor([[1, 5, 9, 20, 33, 41]]), torch.tensor([[7, 8, 9]])
    tree = TokenTree((11, 12, 13, 14), (-1, -1, 0, 0))
    tree_kwargs = tree_attention_inputs(tree, prompt.shape[1], torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(lean(input_ids=prompt).logits, modules(input_ids=prompt).logits)
        outputs = []
        for model in (modules, lean):
            cache = new_cache(model.config)
            prefill = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            chained = model(input_ids=chain, past_key_values=cache, use_cache=True).logits
            truncate_cache(cache, prompt.shape[1])
            tree_logits = model(input_ids=torch.tensor([[7, 11, 12, 13, 14]]), past_key_values=cache, use_cache=True,
                                **tree_kwargs).logits
            outputs.append((prefill, chained, tree_logits))
    for reference, got in zip(*outputs):
        assert torch.equal(reference, got)


def test_runtime_choice_is_explicit():
    model = build_model("llama")
    assert apply_cpu_runtime(model, "torch").kernels == "torch"
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # torch: the model as loaded
    with pytest.raises(ValueError, match="unknown CPU kernels"):
        apply_cpu_runtime(model, "fast")
    with pytest.raises(RuntimeUnavailableError, match="bfloat16"):
        apply_cpu_runtime(build_model("llama").to(torch.bfloat16), "packed")
    bf16 = apply_cpu_runtime(build_model("llama").to(torch.bfloat16), "auto")
    assert bf16.kernels == "torch" and "bfloat16" in bf16.reason


@pytest.mark.skipif(kernel_unavailable_reason() is not None, reason=f"packed kernel: {kernel_unavailable_reason()}")
def test_packed_products_on_several_threads_give_the_same_bits():
    """The runtime takes the service's thread count; the columns of each product are dealt out among the
    threads, each output still one thread's chain: the logits are identical to one thread's."""
    threads = torch.get_num_threads()
    prompt, tree = [1, 5, 9, 20, 33, 7, 8], TokenTree((11, 12, 13, 14, 15, 16), (-1, -1, 0, 0, 2, 1))
    results = {}
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            model = build_model("llama", context=256)
            runtime = apply_cpu_runtime(model, "auto")
            assert runtime.kernels == "packed" and runtime.threads == count
            assert ("on 3 threads" in runtime.describe()) == (count == 3)
            with torch.inference_mode():
                long_rows = model(input_ids=torch.tensor([list(range(1, 90))])).logits
            results[count] = long_rows, tree_attention.tree_logits(model, prompt, tree), greedy(model, prompt, 20, new_cache)
    finally:
        torch.set_num_threads(threads)
        use_threads(threads)
    assert torch.equal(results[1][0], results[3][0]) and torch.equal(results[1][1], results[3][1])
    assert results[1][2] == results[3][2]


class _Attention:
    num_key_value_groups = 3
    is_causal = True
    training = False


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "per_head"])
@pytest.mark.parametrize("length", [1, 5, SHORT_QUERY_TOKENS + 3])
def test_grouped_query_attention_equals_eager_attention(length, mask_kind):
    torch.manual_seed(length)
    heads, kv_heads, past, dim = 6, 2, 11, 8
    module = _Attention()
    module.num_key_value_groups = heads // kv_heads
    query = torch.randn(1, heads, length, dim)
    key, value = torch.randn(1, kv_heads, past + length, dim), torch.randn(1, kv_heads, past + length, dim)
    visible = torch.ones(length, past + length, dtype=torch.bool)
    visible[:, past:] = torch.ones(length, length, dtype=torch.bool).tril()
    visible[length // 2:, 3] = False  # not only causal: some cached positions hidden from some rows
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    masks = {"none": None, "bool": visible[None, None], "float": additive[None, None],
             "per_head": visible[None, None].expand(1, heads, -1, -1)}
    mask = masks[mask_kind]
    if mask is None and length > 1:
        key, value = key[:, :, past:], value[:, :, past:]  # no mask with several rows: a causal prefill
        reference_mask = torch.zeros(length, length).masked_fill(~visible[:, past:], float("-inf"))[None, None]
    else:
        reference_mask = None if mask is None else additive[None, None]
    got, _ = grouped_query_attention(module, query, key, value, mask, scaling=dim ** -0.5)
    expected, _ = eager_attention_forward(module, query, key, value, reference_mask, scaling=dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_growable_cache_keeps_what_a_dynamic_cache_keeps():
    """Appends, crops and tree selections give the same keys and values as transformers' DynamicCache."""
    config = build_model("llama").config
    growable, reference = new_cache(config), DynamicCache(config=config)
    assert all(isinstance(layer, GrowableLayer) for layer in growable.layers)
    torch.manual_seed(0)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def append(count: int) -> None:
        for index in range(len(reference.layers)):
            keys, values = torch.randn(1, heads, count, dim), torch.randn(1, heads, count, dim)
            for cache in (growable, reference):
                cache.update(keys, values, index)

    with torch.inference_mode():
        for step in range(12):
            append(1 + 7 * (step % 3) + 40 * (step == 4))
            if step % 4 == 1:
                for cache in (growable, reference):
                    truncate_cache(cache, cache.get_seq_length() - 3)
            if step % 4 == 2:
                length = reference.get_seq_length()
                for cache in (growable, reference):
                    select_cache_positions(cache, length - 6, torch.tensor([length - 5, length - 2, length - 1]))
            for mine, theirs in zip(growable.layers, reference.layers):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert growable.get_seq_length() == reference.get_seq_length()
    buffer = growable.layers[0]._key_buffer
    assert buffer.shape[-2] % 64 == 0 and buffer.shape[-2] < 2 * growable.get_seq_length() + 64
