"""The target side of a session: prefill, then verify each proposal in one forward pass.

The KV cache holds every committed token but the last (the *pending* token, committed by the previous
verdict and fed at the front of the next forward). A proposal is scored as [pending, node_1 .. node_n]:
a chain with the plain causal mask, a tree with an ancestor mask and depth-based positions (when the
model passed the tree-attention self-check at load; otherwise it takes chains only). Afterwards the cache
keeps the pending token and the accepted path only.

Prefills and verifications are *jobs*: generators that validate their input when first advanced, yield
the tokens they need scored (``NewTokens``; a prompt in chunks of ``prefill_chunk_tokens``) and receive
each pass's logits, then return their outcome. The scheduler (``duo.verify_service.scheduler``) runs the
waiting jobs of many sessions in one pass; ``open`` and ``verify`` run one job alone (tests, tools).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from duo.common import batched_forward
from duo.common.acceptance import Acceptance, accept_greedy, accept_sampled, accept_seeded
from duo.common.batched_forward import NewTokens
from duo.common.decoder_ops import SHORT_QUERY_TOKENS
from duo.common.errors import InvalidArgument, ResourceExhausted
from duo.common.kv_cache import new_cache
from duo.common.limits import check_prompt_fits, checked_token_ids
from duo.common.models import LoadedModel, select_cache_positions, truncate_cache
from duo.common.params import DecodingParams
from duo.common.pass_scheduler import Job, Scored
from duo.common.sampling import logits_to_probs, make_generator, race, race_noise, race_noise_rows, sample
from duo.common.tree import TokenTree
from duo.common.tree_attention import supports_tree_attention, tree_layout


@dataclass(eq=False)
class TargetSession:
    prompt: tuple[int, ...]
    params: DecodingParams
    generator: torch.Generator
    cache: DynamicCache
    cached_tokens: int = 0  # sequence positions held in the cache
    pending_token: int | None = None  # committed, not yet in the cache (None: not prefilled yet)


@dataclass(frozen=True)
class Prefill:
    session: TargetSession
    first_token: int
    compute_s: float  # its passes' seconds
    queue_s: float = 0.0  # seconds it waited for those passes


@dataclass(frozen=True)
class VerifyOutcome:
    acceptance: Acceptance
    compute_s: float  # the forward pass's seconds
    batch_sessions: int = 1  # sessions that pass served
    batch_tokens: int = 0  # tokens it scored, over all its sessions
    queue_s: float = 0.0  # how long the proposal waited for that pass


class TargetVerifier:
    """Owns the target model; sessions share it, one forward pass at a time (a pass may serve many)."""

    def __init__(self, loaded: LoadedModel, max_tree_nodes: int = 64, tree_attention: bool | None = None,
                 prefill_chunk_tokens: int | None = None, kv_cache_tokens: int | None = None):
        self.model = loaded.model
        if tree_attention is None:
            tree_attention = supports_tree_attention(loaded.model)
        self.info = replace(loaded.info, max_tree_nodes=max_tree_nodes, tree_attention=tree_attention)
        self.max_tree_nodes = max_tree_nodes
        self.batches = batched_forward.runs_together(self.model)
        # Where sessions share passes, a prompt is prefilled in chunks that fit a shared pass, so a long one
        # holds the others up for one chunk at a time; elsewhere in one piece.
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = SHORT_QUERY_TOKENS if self.batches else self.info.max_context_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.kv_cache_tokens = kv_cache_tokens  # positions all sessions' caches may hold (None: no bound)
        self._forward_lock = threading.Lock()
        self._sessions: weakref.WeakSet[TargetSession] = weakref.WeakSet()  # those still referenced somewhere
        self._sessions_lock = threading.Lock()  # sessions start on stream threads, metrics read from another
        self._admission_lock = threading.Lock()

    def cached_tokens(self) -> int:
        """Positions held in the KV caches of all live sessions (a prompt counts from its session's start)."""
        with self._sessions_lock:
            sessions = list(self._sessions)
        return sum(max(session.cached_tokens, len(session.prompt)) for session in sessions)

    def new_session(self, prompt_ids: tuple[int, ...], params: DecodingParams) -> TargetSession:
        """A session for this prompt (checked), not prefilled yet."""
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty: give at least one token")
        prompt_ids = checked_token_ids(prompt_ids, self.info.vocab_size, "prompt")
        check_prompt_fits(len(prompt_ids), self.info.max_context_tokens)
        session = TargetSession(tuple(prompt_ids), params, make_generator(params.seed), new_cache(self.model.config))
        with self._admission_lock:  # one admission at a time, so two cannot both take the last positions
            held = self.cached_tokens()
            if self.kv_cache_tokens is not None and held + len(prompt_ids) > self.kv_cache_tokens:
                raise ResourceExhausted(
                    f"the verifier's KV caches hold {held} of their {self.kv_cache_tokens} positions (--kv-cache-tokens) "
                    f"and this prompt needs {len(prompt_ids)}; retry later or on another replica"
                )
            with self._sessions_lock:
                self._sessions.add(session)
        return session

    def prefill_job(self, session: TargetSession) -> Job:
        """The job that prefills the session's prompt and picks its first token; returns a ``Prefill``."""
        compute_s = queue_s = 0.0
        prompt, chunk = session.prompt, self.prefill_chunk_tokens
        for start in range(0, len(prompt), chunk):
            last = start + chunk >= len(prompt)
            scored = yield NewTokens(prompt[start:start + chunk], session.cache, kept_logits=1 if last else 0)
            compute_s += scored.pass_s
            queue_s += scored.wait_s
        probs = logits_to_probs(scored.logits[-1:], session.params)[0]
        if session.params.is_greedy:
            first = int(probs.argmax())
        elif session.params.is_seeded_sampling:
            first = int(race(probs, race_noise(session.params.seed, len(prompt), probs.shape[-1])))
        else:
            first = sample(probs, session.generator)
        session.cached_tokens, session.pending_token = len(prompt), first
        return Prefill(session, first, compute_s, queue_s)

    def verify_job(self, session: TargetSession, tree: TokenTree) -> Job:
        """The job that scores a proposal and keeps what the target accepts; returns a ``VerifyOutcome``."""
        self.check_proposal(session, tree)
        tokens = (session.pending_token, *tree.token_ids)
        if tree.is_chain:
            scored = yield NewTokens(tokens, session.cache, kept_logits=len(tokens))
        else:
            positions, visible = tree_layout(tree, session.cached_tokens)
            scored = yield NewTokens(tokens, session.cache, positions, visible, kept_logits=len(tokens))
        if session.params.is_greedy:
            acceptance = accept_greedy(tree, scored.logits)
        elif session.params.is_seeded_sampling:
            probs = logits_to_probs(scored.logits, session.params)
            # row 0 (the pending token's logits) draws the token at position cached_tokens + 1
            rows = 1 + max(tree.depths(), default=0)
            noise = race_noise_rows(session.params.seed, session.cached_tokens + 1, rows, probs.shape[-1])
            acceptance = accept_seeded(tree, probs, noise)
        else:
            acceptance = accept_sampled(tree, logits_to_probs(scored.logits, session.params), session.generator)
        self._keep_accepted(session, tree, acceptance)
        return VerifyOutcome(acceptance, scored.pass_s, scored.pass_sequences, scored.pass_tokens, scored.wait_s)

    def check_proposal(self, session: TargetSession, tree: TokenTree) -> None:
        if session.pending_token is None:
            raise InvalidArgument("the session is not prefilled yet")
        tree.validate(self.info.vocab_size, self.max_tree_nodes)
        if not tree.is_chain and not self.info.tree_attention:
            raise InvalidArgument(
                "this verifier's model cannot take a tree attention mask (ModelInfo.tree_attention is false): "
                "propose chains"
            )
        if session.params.needs_draft_probs and len(tree) and tree.draft_probs is None:
            raise InvalidArgument("unseeded sampling needs a draft distribution for every proposed node")
        if session.cached_tokens + 1 + len(tree) > self.info.max_context_tokens:
            raise InvalidArgument(
                f"the proposal would run past the target's context of {self.info.max_context_tokens} tokens"
            )

    def forward(self, batch: list[NewTokens]) -> list[torch.Tensor]:
        """One pass over the batch's sequences (``batched_forward.forward``): each one's kept logits."""
        with self._forward_lock:
            return batched_forward.forward(self.model, batch, SHORT_QUERY_TOKENS)

    def open(self, prompt_ids: tuple[int, ...], params: DecodingParams) -> Prefill:
        """A new session prefilled alone, outside any scheduler."""
        return self.run_alone(self.prefill_job(self.new_session(prompt_ids, params)))

    def verify(self, session: TargetSession, tree: TokenTree) -> VerifyOutcome:
        """A proposal verified alone, outside any scheduler."""
        return self.run_alone(self.verify_job(session, tree))

    def run_alone(self, job: Job):
        """Drive one job to its outcome, one pass per step."""
        try:
            tokens = next(job)
            while True:
                started = time.perf_counter()
                logits = self.forward([tokens])[0]
                tokens = job.send(Scored(logits, time.perf_counter() - started, 1, len(tokens.token_ids)))
        except StopIteration as finished:
            return finished.value

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
