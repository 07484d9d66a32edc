"""What one target forward pass costs for k new tokens over a cached context, per CPU runtime variant.

Speculative decoding pays when verifying k proposed tokens costs about as much as decoding one. This
measures it the way the verify service runs the model (``load_causal_lm`` with the variant's
``--cpu-kernels`` and ``--dtype``, duo's KV cache, a cached context of ``--context`` tokens, k new tokens
fed as a chain, or as a token tree with its attention mask with ``--tree``, then the cache cropped
back), and prints the median time per k and cost(k) / cost(1). Variants and k values are interleaved
(every repeat runs every variant at every k), so drift in machine load hits all alike. Run it alone.

    python benchmarks/forward_cost.py                       # default target, 1 thread, fp32 torch vs packed
    python benchmarks/forward_cost.py --threads 2 --variants torch-float32,packed-float32,torch-bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duo.common.default_models import DEFAULT_TARGET
from duo.common.kv_cache import new_cache
from duo.common.models import load_causal_lm
from duo.common.tree import TokenTree
from duo.common.tree_attention import tree_attention_inputs

DEFAULT_K = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the services' --threads)")
    parser.add_argument("--variants", default="torch-float32,packed-float32",
                        help="comma-separated KERNELS-DTYPE (kernels: torch, packed; dtype: float32, bfloat16)")
    parser.add_argument("--context", type=int, default=300, help="cached tokens before the new ones")
    parser.add_argument("--k", default=",".join(map(str, DEFAULT_K)), help="new-token counts to measure")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per variant and k (median)")
    parser.add_argument("--tree", action="store_true", help="feed the k tokens as a width-3 tree with its mask")
    return parser.parse_args()


def width3_tree(nodes: int, tokens: list[int]) -> TokenTree:
    """A breadth-first tree where every node has up to three children (the shape of duo's default trees)."""
    return TokenTree(tuple(tokens[:nodes]), tuple(-1 if i < 3 else (i - 3) // 3 for i in range(nodes)))


class Variant:
    def __init__(self, name: str, model: str):
        kernels, dtype = name.split("-", 1)
        self.name = name
        self.loaded = load_causal_lm(model, "cpu", dtype, kernels)
        self.cache = new_cache(self.loaded.model.config)
        self.context_length = 0

    def prefill(self, context: list[int]) -> None:
        with torch.inference_mode():
            self.loaded.model(input_ids=torch.tensor([context]), past_key_values=self.cache, use_cache=True)
        self.context_length = len(context)

    def forward_s(self, tokens: list[int], tree: TokenTree | None) -> float:
        """Seconds for one forward pass of ``tokens`` after the context; the cache is restored after."""
        model = self.loaded.model
        kwargs = {} if tree is None else tree_attention_inputs(tree, self.context_length, model.dtype,
                                                               torch.device("cpu"))
        input_ids = torch.tensor([tokens])
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, **kwargs)
            elapsed = time.perf_counter() - started
        self.cache.crop(-len(tokens))
        return elapsed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    generator = torch.Generator().manual_seed(0)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    variants = [Variant(name, args.model) for name in names]
    vocab = variants[0].loaded.info.vocab_size
    context = torch.randint(0, vocab, (args.context,), generator=generator).tolist()
    for variant in variants:
        variant.prefill(context)
        print(f"{variant.name}: {variant.loaded.info.dtype}, {variant.loaded.runtime.describe()}", flush=True)
    new_tokens = {k: torch.randint(0, vocab, (k,), generator=generator).tolist() for k in ks}
    times: dict[tuple[str, int], list[float]] = {(v.name, k): [] for v in variants for k in ks}
    for repeat in range(args.repeats + 2):  # two warm-up rounds
        for k in ks:
            tokens = new_tokens[k]
            tree = width3_tree(k - 1, tokens[1:]) if args.tree and k > 1 else None
            for variant in variants:
                elapsed = variant.forward_s(tokens, tree)
                if repeat >= 2:
                    times[variant.name, k].append(elapsed)

    shape = "trees (width 3)" if args.tree else "chains"
    print(f"\nforward pass over k new tokens after {args.context} cached, {args.threads} thread(s), {shape}, "
          f"median of {args.repeats}: ms, and cost(k)/cost(1)")
    print(f"{'k':>4}" + "".join(f"{v.name:>26}" for v in variants))
    for k in ks:
        row = f"{k:>4}"
        for variant in variants:
            median = statistics.median(times[variant.name, k])
            base = statistics.median(times[variant.name, ks[0]])
            row += f"{median * 1000:>16.1f} ms {median / base:>5.2f}x"
        print(row)


if __name__ == "__main__":
    main()
