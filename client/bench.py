"""``duo-client bench``: duo against HF baselines on the same models, cores and prompts, in one run.

Systems, run in turn for every prompt (alternating, so drift in machine load hits all alike):
  hf-generate      HF ``generate`` of the target alone, greedy (torch threads = duo's two services together)
  hf-generate-bf16 the same in bfloat16: a speed baseline only (other numerics, so other tokens at times);
                   "× HF" divides by the faster of the two HF ``generate`` runs
  hf-assisted      HF assisted generation with the same draft model
  duo-nospec       duo with speculation off: the target alone through the verify service
  duo-fixed        duo with a fixed draft budget
  duo-sequential   duo with a fixed budget and drafting only after each verdict (no overlap)
  duo-auto         duo with the latency-aware budget
Greedy outputs of all systems but hf-generate-bf16 must be identical; the report says where they are not.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from duo.client.orchestrator import FixedBudget, GenerationRequest, GenerationResult, Orchestrator
from duo.common.budget import AdaptiveBudget, ControllerConfig, SharedEstimates
from duo.common.default_models import ModelNotAvailableError
from duo.common.models import load_failure
from duo.common.params import StoppingParams
from duo.common.progress import hide_progress_bars_off_terminal

HF_GENERATE = ("hf-generate", "hf-generate-bf16")  # the speed base: the faster of these
OTHER_NUMERICS = ("hf-generate-bf16",)  # not held to the reference's tokens
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "bench_prompts.jsonl"  # a prompt file (prompt_sets)
ALL_SYSTEMS = ("hf-generate", "hf-generate-bf16", "hf-assisted", "duo-nospec", "duo-fixed", "duo-sequential",
               "duo-auto")


@dataclass
class Run:
    """One system on one prompt."""

    system: str
    prompt_index: int
    token_ids: list[int]
    total_s: float
    ttft_s: float
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s_per_round: float = 0.0
    verify_s_per_round: float = 0.0
    network_s_per_round: float = 0.0
    first_token: dict[str, float] = field(default_factory=dict)  # duo's breakdown (GenerationResult.first_token)


@dataclass
class SystemSummary:
    system: str
    tokens_per_s: float
    ratio_to_hf_generate: float
    ttft_p50_s: float
    ttft_p90_s: float
    mean_committed_per_round: float | None
    acceptance_rate: float | None
    overlap_efficiency: float | None
    new_tokens: int
    identical_to_reference: bool | None  # None: not compared (another dtype computes other numerics)
    runs: list[Run] = field(repr=False, default_factory=list)


class HfBaselines:
    """The target (and draft) loaded in this process, for HF generate and assisted generation. torch and
    transformers are imported here, when the baselines load, not with the module (duo-client imports it)."""

    def __init__(self, target_path: str, draft_path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        hide_progress_bars_off_terminal()
        self.tokenizer = _loaded(target_path, AutoTokenizer.from_pretrained)
        self.target = _loaded(target_path, AutoModelForCausalLM.from_pretrained, dtype=torch.float32).eval()
        self.draft = _loaded(draft_path, AutoModelForCausalLM.from_pretrained, dtype=torch.float32).eval()
        self._target_path = target_path
        self._target_bf16 = None

    def model_for(self, system: str):
        if system != "hf-generate-bf16":
            return self.target
        if self._target_bf16 is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._target_bf16 = AutoModelForCausalLM.from_pretrained(self._target_path, dtype=torch.bfloat16).eval()
        return self._target_bf16

    def run(self, system: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, float]:
        """New token ids, total seconds, seconds to the first new token."""
        import torch

        streamer = _FirstTokenClock()
        extra = {"assistant_model": self.draft} if system == "hf-assisted" else {}
        started = time.perf_counter()
        streamer.started = started
        with torch.inference_mode():
            output = self.model_for(system).generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                          do_sample=False, streamer=streamer, **extra)
        total = time.perf_counter() - started
        return output[0, len(prompt_ids):].tolist(), total, (streamer.first_at or started + total) - started


def _loaded(path: str, load: Callable, **kwargs):
    """``load(path)``; a failure is the one line that says why (``duo.common.models.load_failure``)."""
    try:
        return load(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"the HF baselines: {load_failure(path, exc)}") from exc


class _FirstTokenClock:
    """A generate() streamer that only notes when the first new token arrives."""

    def __init__(self):
        self.started = 0.0
        self.first_at: float | None = None
        self._calls = 0

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2 and self.first_at is None:  # the first call carries the prompt
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def duo_run(system: str, orchestrator: Orchestrator, prompt_ids: list[int], max_new_tokens: int,
            fixed_budget: int, max_branches: int = 1, learnt: SharedEstimates | None = None) -> GenerationResult:
    """One prompt through duo; duo-auto starts from what its earlier sessions ``learnt`` (as a client that
    keeps running does), else cold."""
    policies: dict[str, Callable] = {
        "duo-nospec": lambda: FixedBudget(0),
        "duo-fixed": lambda: FixedBudget(fixed_budget, max_branches),
        "duo-sequential": lambda: FixedBudget(fixed_budget, max_branches),
        "duo-auto": lambda: AdaptiveBudget(ControllerConfig(max_branches=max_branches), learnt),
    }
    request = GenerationRequest(prompt_ids=tuple(prompt_ids),
                                stopping=StoppingParams(max_new_tokens=max_new_tokens),
                                sequential=system == "duo-sequential")
    return orchestrator.generate(request, policies[system]())


def run_from_result(system: str, index: int, result: GenerationResult) -> Run:
    rounds = result.rounds
    count = max(len(rounds), 1)
    return Run(
        system=system, prompt_index=index, token_ids=result.token_ids, total_s=result.total_s,
        ttft_s=result.ttft_s, rounds=len(rounds),
        drafted=sum(r.proposal_size for r in rounds), accepted=sum(r.accepted_size for r in rounds),
        draft_s_per_round=sum(r.draft_compute_s for r in rounds) / count,
        verify_s_per_round=sum(r.verify_compute_s for r in rounds) / count,
        network_s_per_round=sum(max(0.0, r.verify_round_trip_s - r.verify_compute_s) for r in rounds) / count,
        first_token=result.first_token(),
    )


def summarise(runs: list[Run], systems: list[str]) -> list[SystemSummary]:
    """Aggregate per system. The reference output is the first system's (HF generate when present); the
    speed base is the faster HF ``generate`` (float32 or bfloat16) when one ran, else the first system."""
    reference = {run.prompt_index: run.token_ids for run in runs if run.system == systems[0]}
    by_system = {system: [run for run in runs if run.system == system] for system in systems}
    rates = {}
    for system, mine in by_system.items():
        total_s = sum(run.total_s for run in mine)
        rates[system] = sum(len(run.token_ids) for run in mine) / total_s if total_s else 0.0
    base_rate = max((rate for system, rate in rates.items() if system in HF_GENERATE), default=rates[systems[0]])
    summaries = []
    for system, mine in by_system.items():
        new_tokens = sum(len(run.token_ids) for run in mine)
        rate = rates[system]
        rounds = sum(run.rounds for run in mine)
        drafted = sum(run.drafted for run in mine)
        summaries.append(SystemSummary(
            system=system,
            tokens_per_s=rate,
            ratio_to_hf_generate=rate / base_rate if base_rate else 0.0,
            ttft_p50_s=percentile([run.ttft_s for run in mine], 0.5),
            ttft_p90_s=percentile([run.ttft_s for run in mine], 0.9),
            mean_committed_per_round=(sum(len(r.token_ids) - 1 for r in mine) / rounds) if rounds else None,
            acceptance_rate=(sum(run.accepted for run in mine) / drafted) if drafted else None,
            overlap_efficiency=_overlap_efficiency(mine) if rounds else None,
            new_tokens=new_tokens,
            identical_to_reference=None if system in OTHER_NUMERICS else all(
                run.token_ids == reference.get(run.prompt_index) for run in mine),
            runs=mine,
        ))
    return summaries


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (the median of an even count: the upper middle value)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _overlap_efficiency(runs: list[Run]) -> float:
    """Measured decode tokens/s ÷ the bound τ / max(T_draft, T_verify + RTT), over all rounds."""
    rounds = sum(run.rounds for run in runs)
    committed = sum(len(run.token_ids) - 1 for run in runs)
    decode_s = sum(run.total_s - run.ttft_s for run in runs)
    tau = committed / rounds
    draft_s = sum(run.draft_s_per_round * run.rounds for run in runs) / rounds
    verify_s = sum((run.verify_s_per_round + run.network_s_per_round) * run.rounds for run in runs) / rounds
    bound = tau / max(draft_s, verify_s)
    return (committed / decode_s) / bound if decode_s > 0 and bound > 0 else 0.0


def format_table(summaries: list[SystemSummary]) -> str:
    header = (f"{'system':<16}{'tok/s':>8}{'× HF':>7}{'TTFT p50':>9}{'p90 ms':>7}{'tok/round':>10}{'accept':>8}"
              f"{'overlap':>9}  same")
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(
            f"{s.system:<16}{s.tokens_per_s:>8.2f}{s.ratio_to_hf_generate:>7.2f}{s.ttft_p50_s * 1000:>9.0f}"
            f"{s.ttft_p90_s * 1000:>7.0f}"
            f"{_opt(s.mean_committed_per_round, '.2f'):>10}{_opt(s.acceptance_rate, '.0%'):>8}"
            f"{_opt(s.overlap_efficiency, '.2f'):>9}  {_same(s.identical_to_reference)}"
        )
    return "\n".join(lines)


def _same(identical: bool | None) -> str:
    return "n/a" if identical is None else "yes" if identical else "NO"


def _opt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_json(path: Path, summaries: list[SystemSummary], meta: dict) -> None:
    payload = {"meta": meta, "systems": [asdict(s) for s in summaries]}
    path.write_text(json.dumps(payload, indent=2))


def chart_unavailable_reason() -> str | None:
    """Why ``save_chart`` cannot run here (matplotlib, of duo's ``bench`` extra, is missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--chart needs matplotlib, which duo's bench extra installs: pip install -e '.[bench]' in duo's "
                "folder (or pip install matplotlib)")
    return None


def save_chart(path: Path, summaries: list[SystemSummary], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    names = [s.system for s in summaries]
    axis.bar(names, [s.tokens_per_s for s in summaries], color="#4a7bb7")
    for index, s in enumerate(summaries):
        axis.text(index, s.tokens_per_s, f"{s.ratio_to_hf_generate:.2f}×", ha="center", va="bottom")
    axis.set_ylabel("tokens / s")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
