"""Batching across sessions: a session's output never depends on what shares its forward passes.

On the lean Llama runtime several sequences share one pass (products over all rows, attention per sequence
over its own cache): each one's logits and cache are bit for bit those of a pass over it alone. Through the
schedulers and the real services, sessions that run at the same time (different prompts, chains and trees,
greedy and seeded sampling, one cancelled midway) produce exactly what each produces alone.
"""

from __future__ import annotations

import functools
import gc
import random
import threading
import time

import grpc
import pytest
import torch

from duo.common.budget import AdaptiveBudget, BudgetModel, ControllerConfig
from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.draft_service.tree_drafter import TreeDrafter
from duo.common import batched_forward
from duo.common.batched_forward import NewTokens
from duo.common.cpu_runtime import apply_cpu_runtime
from duo.common.errors import Cancelled, ResourceExhausted
from duo.common.events import RoundTimings
from duo.common.kv_cache import new_cache
from duo.common.metrics import ServiceMetrics
from duo.common.packed_linear import kernel_unavailable_reason
from duo.common.params import DecodingParams, StoppingParams
from duo.common.pass_scheduler import PassScheduler, sequences_in_pass
from duo.common.tree import TokenTree
from duo.common.tree_attention import tree_layout
from tests.inprocess import draft_server, verify_server
from tests.tiny_models import build_model, reference_greedy
from duo.verify_service.engine import TargetVerifier
from duo.verify_service.kv_budget import bytes_per_position, default_kv_cache_tokens, free_memory_bytes
from duo.verify_service.scheduler import VerifyScheduler

needs_packed = pytest.mark.skipif(kernel_unavailable_reason() is not None,
                                  reason=f"packed kernel: {kernel_unavailable_reason()}")

TREE = TokenTree((11, 12, 13, 14, 15, 16), (-1, -1, 0, 0, 2, 1))


def test_a_pass_takes_the_oldest_work_that_fits_and_always_the_oldest():
    assert sequences_in_pass([5, 5, 5], max_tokens=12, max_sequences=8) == 2
    assert sequences_in_pass([5, 5, 5], max_tokens=100, max_sequences=2) == 2
    assert sequences_in_pass([300, 1], max_tokens=256, max_sequences=8) == 1  # too large: runs alone
    assert sequences_in_pass([1, 300, 1], max_tokens=256, max_sequences=8) == 1  # never skips ahead


def lean_model():
    model = build_model("llama")
    assert apply_cpu_runtime(model, "packed").lean_forward
    assert batched_forward.runs_together(model)
    return model


def prefilled_cache(model, prompt):
    cache = new_cache(model.config)
    batched_forward.forward(model, [NewTokens(tuple(prompt), cache)], 64)
    return cache


def tree_tokens(cache, tree: TokenTree, root: int) -> NewTokens:
    positions, visible = tree_layout(tree, cache.get_seq_length())
    return NewTokens((root, *tree.token_ids), cache, positions, visible, kept_logits=len(tree) + 1)


@needs_packed
def test_sequences_sharing_a_pass_get_exactly_their_logits_and_caches_alone():
    model = lean_model()
    prompts = [[1, 5, 9, 20, 33], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [3], list(range(20, 90))]

    def work(caches):  # a tree, a chain, a decoding step, and a prompt
        return [tree_tokens(caches[0], TREE, 7), NewTokens((7, 8, 9), caches[1], kept_logits=3),
                NewTokens((4,), caches[2], kept_logits=1), NewTokens(tuple(range(10, 30)), caches[3], kept_logits=1)]

    alone_caches = [prefilled_cache(model, p) for p in prompts]
    alone = [batched_forward.forward(model, [tokens], 64)[0] for tokens in work(alone_caches)]
    shared_caches = [prefilled_cache(model, p) for p in prompts]
    shared = batched_forward.forward(model, work(shared_caches), 64)
    for one, together in zip(alone, shared):
        assert torch.equal(one, together)
    for one, together in zip(alone_caches, shared_caches):
        for layer_alone, layer_shared in zip(one.layers, together.layers):
            assert torch.equal(layer_alone.keys, layer_shared.keys)
            assert torch.equal(layer_alone.values, layer_shared.values)


@needs_packed
def test_a_prompt_prefilled_in_chunks_matches_it_prefilled_whole():
    """Chunks attend to the earlier chunks' cache exactly as one pass would, up to summation order."""
    prompt = tuple(range(1, 95)) * 2  # longer than the vocabulary
    whole = TargetVerifier(load_model_info(lean_model()), prefill_chunk_tokens=256)
    chunked = TargetVerifier(load_model_info(lean_model()), prefill_chunk_tokens=16)
    a, b = whole.open(prompt, DecodingParams()), chunked.open(prompt, DecodingParams())
    assert a.first_token == b.first_token and a.session.cached_tokens == b.session.cached_tokens == len(prompt)
    for layer_a, layer_b in zip(a.session.cache.layers, b.session.cache.layers):
        torch.testing.assert_close(layer_a.keys, layer_b.keys, rtol=1e-3, atol=1e-4)  # float32 sums, other order
    # and the sessions go on alike
    assert whole.verify(a.session, TREE).acceptance == chunked.verify(b.session, TREE).acceptance


def load_model_info(model):
    from duo.common.models import LoadedModel, ModelInfo

    return LoadedModel(model, None, ModelInfo("tiny", model.config.vocab_size, "x", (2,), 256, "cpu", "float32"))


def run_session(scheduler, prompt, params, proposals):
    """Prefill, then verify each proposal in turn: the first token and every acceptance."""
    session = scheduler.verifier.new_session(prompt, params)
    outcomes = [scheduler.prefill(session).first_token]
    for tree in proposals:
        outcomes.append(scheduler.verify(session, tree).acceptance)
    scheduler.forget(session)
    return outcomes


@needs_packed
@pytest.mark.parametrize("kernels", ["packed", "torch"])
def test_sessions_verified_together_get_what_each_gets_alone(kernels):
    """Greedy and seeded sampled sessions, chains and trees, prompts in several chunks, started at once:
    the scheduler batches their work, and each session's tokens are its tokens alone. (On torch's kernels
    each sequence runs its own pass inside the batch: the same outcome, without the saving.)"""
    model = build_model("llama")
    apply_cpu_runtime(model, kernels)
    verifier = TargetVerifier(load_model_info(model), prefill_chunk_tokens=8)
    sampled = DecodingParams(temperature=0.9, seed=5)
    probs = torch.full((6, verifier.info.vocab_size), 1.0 / verifier.info.vocab_size)
    sampled_tree = TokenTree(TREE.token_ids, TREE.parents, probs)
    sessions = [
        ((1, 5, 9, 20, 33), DecodingParams(), [TREE, TokenTree.chain([7, 8]), TokenTree.empty(), TREE]),
        (tuple(range(30, 60)), DecodingParams(), [TokenTree.chain([4, 5, 6]), TREE, TokenTree.chain([9])]),
        ((2, 3), sampled, [sampled_tree, sampled_tree, TokenTree.empty(), sampled_tree]),
        (tuple(range(60, 81)), DecodingParams(), [TokenTree.empty()] * 4),
    ]
    metrics = ServiceMetrics()
    with_batching = VerifyScheduler(verifier, max_batch_tokens=64, max_batch_sessions=8, metrics=metrics)
    one_per_pass = VerifyScheduler(verifier, max_batch_sessions=1)
    try:
        alone = [run_session(one_per_pass, *session) for session in sessions]
        together: list = [None] * len(sessions)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, run_session(with_batching, *sessions[i])))
                   for i in range(len(sessions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        with_batching.close()
        one_per_pass.close()
    assert together == alone
    passes = metrics.registry.get_sample_value("duo_batch_sequences_count")
    assert metrics.registry.get_sample_value("duo_batch_sequences_sum") > passes  # some passes served several


def test_work_that_fails_fails_alone_and_background_work_waits_for_the_rest():
    """A job that raises gets its own error; its pass's other jobs go on. Background work runs only in
    passes that no other work is waiting for."""
    passes: list[list[tuple[int, ...]]] = []
    release = threading.Event()

    def forward(batch):
        passes.append([tokens.token_ids for tokens in batch])
        if len(passes) == 1:
            release.wait(5)  # hold the first pass while the rest queues
        return [torch.zeros(len(tokens.token_ids), 4) for tokens in batch]

    def failing_job(tokens):
        yield tokens
        raise ValueError("this session's verdict failed")

    scheduler = PassScheduler(forward, max_batch_tokens=64, max_batch_sequences=8)
    errors, results = [], {}

    def run(name, job, background=False):
        try:
            results[name] = scheduler.run(name, job, background)
        except ValueError as exc:
            errors.append((name, str(exc)))

    def one_pass_job(tokens):
        scored = yield tokens
        return scored.pass_sequences

    cache = object()
    first = threading.Thread(target=run, args=("first", one_pass_job(NewTokens((1,), cache))))
    first.start()
    time.sleep(0.2)
    later = [threading.Thread(target=run, args=("ahead", one_pass_job(NewTokens((9, 9), cache)), True)),
             threading.Thread(target=run, args=("bad", failing_job(NewTokens((2,), cache)))),
             threading.Thread(target=run, args=("good", one_pass_job(NewTokens((3,), cache))))]
    for thread in later:
        thread.start()
        time.sleep(0.05)
    release.set()
    for thread in [first, *later]:
        thread.join(5)
    scheduler.close()
    assert errors == [("bad", "this session's verdict failed")]
    assert results == {"first": 1, "good": 2, "ahead": 1}
    assert passes == [[(1,)], [(2,), (3,)], [(9, 9)]]


def test_a_scheduler_refuses_work_after_close_and_a_bad_proposal_is_refused_before_it_queues():
    model = build_model("llama")
    verifier = TargetVerifier(load_model_info(model))
    scheduler = VerifyScheduler(verifier)
    session = verifier.new_session((1, 2, 3), DecodingParams())
    scheduler.prefill(session)
    with pytest.raises(Exception, match="outside the vocabulary|token"):
        scheduler.verify(session, TokenTree.chain([10 ** 6]))
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.prefill(verifier.new_session((1, 2), DecodingParams()))


def test_a_shared_verifier_makes_the_controller_shrink_proposals():
    """With the pass's cost growing by rows (as on a CPU) the best budget alone is a few tokens; when eight
    sessions share each pass, every draft row costs eight rows' time and speculation stops paying."""
    points = tuple((n, 0.034 + 0.010 * (n + 1)) for n in range(0, 160))
    alone = BudgetModel(draft_s_per_token=0.003, verify_points=points, network_s=0.002,
                        acceptance=(0.6, 0.75, 0.8), sharing=1.0)
    shared = BudgetModel(draft_s_per_token=0.003, verify_points=points, network_s=0.002,
                         acceptance=(0.6, 0.75, 0.8), sharing=8.0)
    assert alone.best_budget(16) >= 2
    assert shared.best_budget(16) < alone.best_budget(16)
    assert shared.verify_s(1) == pytest.approx(0.034 + 0.010 * 16)


def test_a_jobs_wait_for_its_pass_is_reported_with_its_logits():
    release = threading.Event()

    def forward(batch):
        release.wait(5)
        return [torch.zeros(len(tokens.token_ids), 4) for tokens in batch]

    def waited(tokens):
        scored = yield tokens
        return scored.wait_s

    scheduler = PassScheduler(forward)
    results = {}
    cache = object()
    first = threading.Thread(target=lambda: results.update(first=scheduler.run("a", waited(NewTokens((1,), cache)))))
    first.start()
    time.sleep(0.1)  # the first pass is running, held
    second = threading.Thread(target=lambda: results.update(second=scheduler.run("b", waited(NewTokens((2,), cache)))))
    second.start()
    time.sleep(0.3)
    release.set()
    first.join(5)
    second.join(5)
    scheduler.close()
    assert results["first"] < 0.1
    assert results["second"] >= 0.25  # it waited for the first pass to end


def _shared_verifier_rounds(controller: AdaptiveBudget, report_queue: bool, rounds: int = 120) -> list[int]:
    """Eight sessions share each pass, whose cost grows by rows (as on a CPU); every proposal also waits
    0.15 s for a pass (the others' schedules); the draft agrees 60% of the time."""
    rng = random.Random(0)
    budgets = []
    for _ in range(rounds):
        budget = controller.budget
        budgets.append(budget)
        pass_tokens = 8 * (budget + 1)
        compute_s, queue_s = 0.034 + 0.010 * pass_tokens, 0.15
        accepted = 0
        while accepted < budget and rng.random() < 0.6:
            accepted += 1
        controller.after_round(RoundTimings(
            draft_compute_s=0.003 * budget, verify_compute_s=compute_s, verify_round_trip_s=compute_s + queue_s + 0.002,
            proposal_size=budget, accepted_size=accepted, draft_tokens=budget, verify_batch_sessions=8,
            verify_batch_tokens=pass_tokens, verify_queue_s=queue_s if report_queue else 0.0))
    return budgets


def test_the_wait_for_a_shared_pass_does_not_make_draft_rows_look_free():
    """Counted as network time, a wait that every round pays whatever its budget dilutes the cost of draft
    rows, and every session keeps speculating into passes that all of them then wait longer for."""
    told = _shared_verifier_rounds(AdaptiveBudget(ControllerConfig(max_branches=1)), report_queue=True)
    not_told = _shared_verifier_rounds(AdaptiveBudget(ControllerConfig(max_branches=1)), report_queue=False)
    assert sum(told[-60:]) < sum(not_told[-60:])
    assert told[-60:].count(0) >= 45


@pytest.mark.parametrize("max_batch_sessions", [8, 1])
def test_concurrent_sessions_through_the_services_equal_each_alone(tiny_pair, max_batch_sessions):
    """Six sessions at once (greedy chains and trees of several budgets, one seeded sampled session, one
    cancelled after its first tokens) through both services: each answer equals the target's own greedy
    output (the sampled one: its output alone), whatever ran beside it."""
    prompts = [[1, 5, 9, 20], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 8], [1, 2, 3, 4, 5, 6, 7]]
    kernels = "packed" if kernel_unavailable_reason() is None else "torch"
    with verify_server(tiny_pair.target_dir, cpu_kernels=kernels, max_batch_sessions=max_batch_sessions) as (addr, _), \
            draft_server(tiny_pair.draft_dir, addr, cpu_kernels=kernels) as (draft_addr, _), \
            grpc.insecure_channel(draft_addr) as channel:
        orchestrator = Orchestrator(channel, timeout_s=60)
        sampled = GenerationRequest(prompt_ids=(1, 5, 9), decoding=DecodingParams(temperature=0.8, seed=11),
                                    stopping=StoppingParams(max_new_tokens=30))
        sampled_alone = orchestrator.generate(sampled, FixedBudget(3)).token_ids
        runs = [(prompts[i % 4], FixedBudget(budget, branches)) for i, (budget, branches)
                in enumerate([(0, 1), (3, 1), (4, 3), (6, 3), (2, 3)])]
        results: dict = {}

        def greedy(index):
            prompt, policy = runs[index]
            request = GenerationRequest(prompt_ids=tuple(prompt), stopping=StoppingParams(max_new_tokens=30))
            results[index] = orchestrator.generate(request, policy).token_ids

        def cancelled():
            request = GenerationRequest(prompt_ids=(1, 2, 3), stopping=StoppingParams(max_new_tokens=200))
            stream = Orchestrator(channel, timeout_s=0.3)
            with pytest.raises(grpc.RpcError):
                stream.generate(request, FixedBudget(4, 3))

        threads = [threading.Thread(target=greedy, args=(i,)) for i in range(len(runs))]
        threads += [threading.Thread(target=cancelled),
                    threading.Thread(target=lambda: results.__setitem__(
                        "sampled", orchestrator.generate(sampled, FixedBudget(3)).token_ids))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    for index, (prompt, _) in enumerate(runs):
        assert results[index] == reference_greedy(tiny_pair.target, prompt, 30, eos_token_id=2)
    assert results["sampled"] == sampled_alone



def test_the_kv_cache_bound_refuses_new_sessions_only_and_frees_with_them():
    """Positions held by all sessions are bounded where sessions start (running ones are never cut short);
    a session that ends gives its positions back."""
    verifier = TargetVerifier(load_model_info(build_model("llama")), kv_cache_tokens=24)
    first = verifier.open(tuple(range(1, 13)), DecodingParams())
    verifier.verify(first.session, TokenTree.chain([5, 6, 7]))  # grows past its prompt: never refused
    assert verifier.cached_tokens() >= 13
    with pytest.raises(ResourceExhausted, match="KV caches hold .* of their 24 positions"):
        verifier.new_session(tuple(range(1, 13)), DecodingParams())
    del first
    gc.collect()
    assert verifier.cached_tokens() == 0
    assert verifier.open(tuple(range(1, 13)), DecodingParams()).first_token >= 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_kv_position_costs_keys_and_values_of_every_layer(arch):
    model = build_model(arch)
    config = model.config
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True).past_key_values
    actual = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 // 3
    assert bytes_per_position(config, torch.float32) == actual
    assert default_kv_cache_tokens(model) > 1000


def test_free_memory_respects_a_containers_memory_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")  # 32 GiB available on the host
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(f"{4 << 30}\n")
    usage.write_text(f"{1 << 30}\n")
    cpu = torch.device("cpu")
    assert free_memory_bytes(cpu, ((str(limit), str(usage)),), str(meminfo)) == 3 << 30
    limit.write_text("max\n")
    assert free_memory_bytes(cpu, ((str(limit), str(usage)),), str(meminfo)) == 32 << 30
    assert free_memory_bytes(cpu, ((str(tmp_path / "none"), str(usage)),), str(meminfo)) == 32 << 30


def test_work_whose_caller_has_gone_is_dropped_before_its_pass():
    """A cancelled stream's queued work (the rest of a long prompt) never reaches a pass."""
    passes, release = [], threading.Event()

    def forward(batch):
        passes.append([tokens.token_ids for tokens in batch])
        release.wait(5)
        return [torch.zeros(len(tokens.token_ids), 4) for tokens in batch]

    def chunks():
        for chunk in ((1, 2), (3, 4), (5, 6)):
            yield NewTokens(chunk, object())

    scheduler = PassScheduler(forward)
    caller_gone = threading.Event()
    errors = []

    def run():
        try:
            scheduler.run("prompt", chunks(), gone=caller_gone.is_set)
        except Cancelled as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)  # the first chunk's pass is running
    caller_gone.set()
    release.set()
    thread.join(5)
    scheduler.close()
    assert passes == [[(1, 2)]] and len(errors) == 1


def test_a_drafters_forwards_are_dropped_once_its_caller_has_gone():
    model = build_model("llama")
    forward = functools.partial(batched_forward.forward, model, fits_together=64)
    scheduler = PassScheduler(forward, name="draft-passes")
    caller_gone = threading.Event()

    def drafter():
        return TreeDrafter(model, DecodingParams(), model.config.vocab_size, frozenset(), 256, passes=scheduler,
                           gone=caller_gone.is_set)

    try:
        drafter().prefill([1, 2, 3])  # a caller still there: its forwards run
        caller_gone.set()
        with pytest.raises(Cancelled):
            drafter().prefill([1, 2, 3])
    finally:
        scheduler.close()
