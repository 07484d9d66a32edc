"""Tree attention: score many branches of a token tree in one forward pass.

Tokens fed together may not all lie on one line: each sees the cached prefix, its own ancestors and
itself, never a sibling branch. Hugging Face causal LMs take that as a 4D additive attention mask
[1, 1, new, cached + new] plus explicit position ids (a node's position is its depth after the root).
Whether a model honours a custom mask depends on its attention code, so ``supports_tree_attention``
checks it once, when a service loads the model, against sequential computation; a model that fails
gets chains only (and says so in ModelInfo.tree_attention).
"""

from __future__ import annotations

import logging

import torch

from duo.common.kv_cache import cache_argument, new_cache
from duo.common.models import output_vocab_size
from duo.common.tree import TokenTree
from duo.common.verdict_cache import read_verdict, verdict_key, write_verdict

log = logging.getLogger(__name__)

# Largest |tree logits - sequential logits|, relative to the logits' scale, that still counts as equal
# (an ignored mask lets siblings see each other and is off by a large fraction of that scale).
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
HALF_PRECISION_TOLERANCE = 3e-2


def attention_inputs(visible: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                     device: torch.device) -> dict:
    """Model kwargs for new tokens: visible [new, cached + new] bool, positions [new] long."""
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return {"attention_mask": mask[None, None].to(device), "position_ids": positions[None].to(device)}


def tree_layout(tree: TokenTree, past: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """Positions and visibility [1 + nodes, past + 1 + nodes] (bool) of [root, nodes] placed after ``past``
    cached positions (the verifier's layout)."""
    visible = torch.cat([torch.ones(len(tree) + 1, past, dtype=torch.bool), tree.ancestor_mask()], dim=1)
    return (past, *(past + depth for depth in tree.depths())), visible


def tree_attention_inputs(tree: TokenTree, past: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Kwargs for [root, nodes] placed after ``past`` cached positions (the verifier's layout)."""
    positions, visible = tree_layout(tree, past)
    return attention_inputs(visible, torch.tensor(positions, dtype=torch.long), dtype, device)


def path_to(tree: TokenTree, node: int) -> list[int]:
    """Token ids from the root's first child down to ``node`` (empty for the root)."""
    tokens: list[int] = []
    while node >= 0:
        tokens.append(tree.token_ids[node])
        node = tree.parents[node]
    return tokens[::-1]


@torch.inference_mode()
def tree_logits(model: torch.nn.Module, prefix: list[int], tree: TokenTree) -> torch.Tensor:
    """Logits [len(tree) + 1, vocab] of [last prefix token, nodes] in one tree forward after the prefix."""
    device = next(model.parameters()).device
    cache = new_cache(model.config)
    if len(prefix) > 1:
        model(input_ids=torch.tensor([prefix[:-1]], device=device), use_cache=True, **cache_argument(model, cache))
    kwargs = tree_attention_inputs(tree, len(prefix) - 1, model.dtype, device)
    input_ids = torch.tensor([[prefix[-1], *tree.token_ids]], device=device)
    return model(input_ids=input_ids, use_cache=True, **cache_argument(model, cache), **kwargs).logits[0].float().cpu()


@torch.inference_mode()
def sequential_logits(model: torch.nn.Module, prefix: list[int], tree: TokenTree) -> torch.Tensor:
    """The same logits, each root-to-node path run on its own with the plain causal mask."""
    device = next(model.parameters()).device
    rows = []
    for node in range(-1, len(tree)):
        input_ids = torch.tensor([prefix + path_to(tree, node)], device=device)
        rows.append(model(input_ids=input_ids).logits[0, -1].float().cpu())
    return torch.stack(rows)


# root ─ a ─ c ─ e          three branches of different depths, siblings at two levels
#      │   └ d
#      └ b ─ f
_CHECK_TREE_SHAPE = (-1, -1, 0, 0, 2, 1)
_CHECK_PREFIX_LENGTH = 5


def _check_token_ids(model: torch.nn.Module, count: int) -> list[int]:
    """Fixed pseudo-random token ids, never the pad token: transformers warns about padding when a row without
    an attention mask holds it, and the self-check runs its plain rows without one."""
    pad = getattr(model.config, "pad_token_id", None)
    vocab = output_vocab_size(model)
    skip = pad if isinstance(pad, int) and 0 <= pad < vocab else None
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(0, vocab - (skip is not None), (count,), generator=generator).tolist()
    return [draw + (skip is not None and draw >= skip) for draw in draws]


def supports_tree_attention(model: torch.nn.Module) -> bool:
    """One-time check: does the model's tree forward match sequential computation? Logs the verdict, and keeps
    it in duo's cache for the next load of the same model with the same code (``verdict_cache``)."""
    key = verdict_key("tree-attention", model)
    if key is not None and (verdict := read_verdict(key)) is not None:
        if verdict:
            log.info("%s: tree attention matches sequential logits (an earlier self-check's verdict)",
                     type(model).__name__)
        else:
            log.warning("%s: tree attention differs from sequential logits (an earlier self-check's verdict): "
                        "chains only", type(model).__name__)
        return verdict
    verdict = _tree_attention_matches(model)
    if key is not None and verdict is not None:
        write_verdict(key, verdict)
    return bool(verdict)


def _tree_attention_matches(model: torch.nn.Module) -> bool | None:
    """The self-check; None where it could not run (not kept: it may run another time)."""
    ids = _check_token_ids(model, _CHECK_PREFIX_LENGTH + len(_CHECK_TREE_SHAPE))
    prefix, nodes = ids[:_CHECK_PREFIX_LENGTH], ids[_CHECK_PREFIX_LENGTH:]
    tree = TokenTree(tuple(nodes), _CHECK_TREE_SHAPE)
    try:
        tree_out = tree_logits(model, prefix, tree)
        reference = sequential_logits(model, prefix, tree)
    except Exception as exc:  # noqa: BLE001 - any failure means: no custom masks for this model
        log.warning("%s cannot take a tree attention mask (%s): chains only", type(model).__name__, exc)
        return None
    error = float((tree_out - reference).abs().max() / reference.abs().max().clamp(min=1.0))
    if not error <= SELF_CHECK_TOLERANCE.get(model.dtype, HALF_PRECISION_TOLERANCE):
        log.warning("%s: tree attention differs from sequential logits (relative error %.2e): chains only",
                    type(model).__name__, error)
        return False
    log.info("%s: tree attention matches sequential logits (relative error %.1e)", type(model).__name__, error)
    return True
