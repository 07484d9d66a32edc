"""The target side of a session: prefill, then verify each proposal in one forward pass.

The KV cache holds every committed token but the last (the *pending* token, committed by the previous
verdict and fed at the front of the next forward). A proposal is scored as [pending, node_1 .. node_n]:
a chain with the plain causal mask, a tree with an ancestor mask and depth-based positions (when the
model passed the tree-attention self-check at load; otherwise it takes chains only). Afterwards the cache
keeps the pending token and the accepted path only.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from duo_common.acceptance import Acceptance, accept_greedy, accept_sampled
from duo_common.errors import InvalidArgument
from duo_common.kv_cache import new_cache
from duo_common.models import LoadedModel, select_cache_positions, truncate_cache
from duo_common.params import DecodingParams
from duo_common.sampling import logits_to_probs, make_generator, sample
from duo_common.tree import TokenTree
from duo_common.tree_attention import supports_tree_attention, tree_attention_inputs


@dataclass
class TargetSession:
    params: DecodingParams
    generator: torch.Generator
    cache: DynamicCache
    cached_tokens: int  # sequence positions held in the cache
    pending_token: int  # committed, not yet in the cache


@dataclass(frozen=True)
class Prefill:
    session: TargetSession
    first_token: int
    compute_s: float


@dataclass(frozen=True)
class VerifyOutcome:
    acceptance: Acceptance
    compute_s: float


class TargetVerifier:
    """Owns the target model; sessions share it, one forward pass at a time."""

    def __init__(self, loaded: LoadedModel, max_tree_nodes: int = 64, tree_attention: bool | None = None):
        self.model = loaded.model
        if tree_attention is None:
            tree_attention = supports_tree_attention(loaded.model)
        self.info = replace(loaded.info, max_tree_nodes=max_tree_nodes, tree_attention=tree_attention)
        self.max_tree_nodes = max_tree_nodes
        self._device = next(self.model.parameters()).device
        self._forward_lock = threading.Lock()
        # A prefill needs the last position's logits only; models that can skip the others say so.
        takes_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if takes_keep else {}

    def open(self, prompt_ids: tuple[int, ...], params: DecodingParams) -> Prefill:
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty: give at least one token")
        self._check_ids(prompt_ids, "prompt")
        if len(prompt_ids) + 1 > self.info.max_context_tokens:
            raise InvalidArgument(
                f"the prompt has {len(prompt_ids)} tokens; the target's context holds {self.info.max_context_tokens} "
                "including at least one new token"
            )
        started = time.perf_counter()
        cache = new_cache(self.model.config)
        logits = self._forward(list(prompt_ids), cache, None, past=0, **self._last_logits_only)[-1:]
        generator = make_generator(params.seed)
        probs = logits_to_probs(logits, params)[0]
        first = int(probs.argmax()) if params.is_greedy else sample(probs, generator)
        session = TargetSession(params, generator, cache, len(prompt_ids), first)
        return Prefill(session, first, time.perf_counter() - started)

    def verify(self, session: TargetSession, tree: TokenTree) -> VerifyOutcome:
        tree.validate(self.info.vocab_size, self.max_tree_nodes)
        if not tree.is_chain and not self.info.tree_attention:
            raise InvalidArgument(
                "this verifier's model cannot take a tree attention mask (ModelInfo.tree_attention is false): "
                "propose chains"
            )
        if not session.params.is_greedy and len(tree) and tree.draft_probs is None:
            raise InvalidArgument("sampled decoding needs a draft distribution for every proposed node")
        if session.cached_tokens + 1 + len(tree) > self.info.max_context_tokens:
            raise InvalidArgument(
                f"the proposal would run past the target's context of {self.info.max_context_tokens} tokens"
            )
        started = time.perf_counter()
        past = session.cached_tokens
        tokens = [session.pending_token, *tree.token_ids]
        tree_shape = None if tree.is_chain else tree
        logits = self._forward(tokens, session.cache, tree_shape, past=past)
        if session.params.is_greedy:
            acceptance = accept_greedy(tree, logits)
        else:
            acceptance = accept_sampled(tree, logits_to_probs(logits, session.params), session.generator)
        self._keep_accepted(session, tree, acceptance)
        return VerifyOutcome(acceptance, time.perf_counter() - started)

    def _keep_accepted(self, session: TargetSession, tree: TokenTree, acceptance: Acceptance) -> None:
        accepted = acceptance.accepted_nodes
        keep = session.cached_tokens + 1 + len(accepted)
        if tree.is_chain:
            truncate_cache(session.cache, keep)
        else:
            positions = torch.tensor([session.cached_tokens + 1 + node for node in accepted], dtype=torch.long)
            select_cache_positions(session.cache, session.cached_tokens + 1, positions)
        session.cached_tokens = keep
        session.pending_token = acceptance.next_token

    def _forward(self, tokens: list[int], cache: DynamicCache, tree: TokenTree | None, past: int,
                 **kwargs) -> torch.Tensor:
        """Logits [len(tokens), vocab] (float32, CPU) for tokens placed after ``past`` cached positions (fewer
        rows, the last ones, with ``logits_to_keep``)."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self._device)
        if isinstance(tree, TokenTree):
            kwargs.update(tree_attention_inputs(tree, past, self.model.dtype, self._device))
        with self._forward_lock, torch.inference_mode():
            output = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, **kwargs)
        return output.logits[0].float().cpu()

    def _check_ids(self, ids: tuple[int, ...], what: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.info.vocab_size]
        if bad:
            raise InvalidArgument(f"{what}: token ids {bad[:5]} are outside the vocabulary [0, {self.info.vocab_size})")

