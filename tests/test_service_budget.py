"""Who steers the draft budget: a request without one gets the draft service's latency-aware controller
(the same one duo-client runs), a request with one keeps it, and a client that sends budget updates steers.
Whoever steers, the output is the target's own."""

import grpc
import pytest

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.draft_service.session_budget import SessionBudget
from duo.common import codec
from duo.common.budget import AdaptiveBudget, ControllerConfig
from duo.common.errors import InvalidArgument
from duo.common.events import BudgetSource, FinishedEvent, RoundTimings
from duo.common.params import DecodingParams, StoppingParams
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.tiny_models import reference_greedy, reference_seeded

PROMPT = [1, 5, 9, 20]


def generate_without_budget(draft_addr: str, request: pb.GenerateRequest) -> tuple[list[int], FinishedEvent, int]:
    """Token ids, the finish, and the budget the session started with."""
    with grpc.insecure_channel(draft_addr) as channel:
        tokens, finished, started_budget = [], None, None
        for message in duo_pb2_grpc.DrafterStub(channel).Generate(request, timeout=60):
            if message.WhichOneof("event") == "started":
                started_budget = message.started.budget.max_draft_tokens
            event = codec.event_from_pb(message)
            if isinstance(event, FinishedEvent):
                finished = event
            elif event is not None:
                tokens.extend(event.token_ids)
        return tokens, finished, started_budget


def test_a_request_without_a_budget_is_steered_by_the_service_and_stays_lossless(tiny_pair, tiny_services):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), stopping=pb.StoppingParams(max_new_tokens=40))
    expected = reference_greedy(tiny_pair.target, PROMPT, 40, eos_token_id=2)
    for _ in range(2):  # the second session starts from what the first learnt
        tokens, finished, _ = generate_without_budget(tiny_services.draft_addr, request)
        assert tokens == expected
        stats = finished.stats
        assert stats.draft_budget_source is BudgetSource.SERVICE
        assert stats.rounds > 0 and stats.drafted_tokens > 0  # it speculated on rounds it chose


def test_a_seeded_sampled_request_without_a_budget_is_steered_and_still_the_targets_own_draws(tiny_pair,
                                                                                             tiny_services):
    # The seed fixes each position's draw, so a budget that follows timings cannot change the answer.
    decoding = DecodingParams(temperature=0.8, seed=7)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), stopping=pb.StoppingParams(max_new_tokens=24),
                                 decoding=codec.decoding_to_pb(decoding))
    expected = reference_seeded(tiny_pair.target, PROMPT, 24, decoding)
    expected = expected[:expected.index(2) + 1] if 2 in expected else expected  # the tiny pair's EOS ends it
    for _ in range(3):
        tokens, finished, _ = generate_without_budget(tiny_services.draft_addr, request)
        assert finished.stats.draft_budget_source is BudgetSource.SERVICE
        assert tokens == expected


class ChangesOnce:
    """A client policy that asks for budget 1 after the first round."""

    max_branches = 1

    def initial(self) -> int:
        return 3

    def after_round(self, timings: RoundTimings) -> int | None:
        return 1


@pytest.mark.parametrize("policy, source", [(FixedBudget(3), BudgetSource.REQUEST),
                                            (ChangesOnce(), BudgetSource.CLIENT)])
def test_a_session_with_a_budget_says_who_steered_it(tiny_pair, tiny_services, policy, source):
    with grpc.insecure_channel(tiny_services.draft_addr) as channel:
        result = Orchestrator(channel, timeout_s=60).generate(
            GenerationRequest(prompt_ids=tuple(PROMPT), stopping=StoppingParams(max_new_tokens=40)), policy)
    assert result.token_ids == reference_greedy(tiny_pair.target, PROMPT, 40, eos_token_id=2)
    assert result.server_stats.draft_budget_source is source


def rounds_of(budget: int, accepted: int) -> RoundTimings:
    return RoundTimings(0.005 * budget, 0.050, 0.050, budget, accepted, budget)


def test_the_client_takes_over_from_the_service_controller():
    controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=8))
    budget = SessionBudget(0, limit=8, controller=controller)
    assert budget() == 4 and budget.source is BudgetSource.SERVICE
    budget.after_round(rounds_of(4, 4))
    assert budget() == controller.budget  # the controller steers
    budget.from_client(2, max_branches=3)
    assert (budget(), budget.max_branches(), budget.source) == (2, 3, BudgetSource.CLIENT)
    for _ in range(5):
        budget.after_round(rounds_of(2, 2))
    assert budget() == 2  # the controller no longer does


def test_the_controller_never_exceeds_the_verifiers_tree_limit_and_bad_client_budgets_are_refused():
    budget = SessionBudget(0, limit=3, controller=AdaptiveBudget(ControllerConfig(initial_budget=3, max_budget=3)))
    for _ in range(20):
        budget.after_round(rounds_of(budget(), budget()))
        assert 0 <= budget() <= 3
    with pytest.raises(InvalidArgument, match="outside"):
        budget.from_client(4)
