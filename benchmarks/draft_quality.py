"""How well a draft model predicts the target, measured on held-out chat prompts (greedy decoding).

For every prompt (chat template applied, generation prompt added) the target greedily decodes up to
``--max-new-tokens`` tokens with a KV cache, stopping after EOS. On that continuation we report:

* per-token agreement: the fraction of positions where the draft's argmax, given the target's prefix,
  equals the target's token;
* mean tokens committed per verification round at each draft budget k, from an exact simulation of greedy
  speculative decoding: each round the draft greedily proposes k tokens from the committed prefix, the target
  accepts the longest prefix that matches its own greedy tokens and adds one token of its own, so a round
  commits accepted + 1 tokens (the proposal is shortened near the end so no round passes the token limit);
* the draft's time per decoded token as a fraction of the target's: incremental single-token decoding with
  a KV cache for both models, on ``--threads`` CPU threads.

Run: ``python benchmarks/draft_quality.py [--draft DIR] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from duo_common.default_models import default_draft_dir, default_target_dir  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Draft-vs-target quality on held-out chat prompts.")
    parser.add_argument("--prompts", type=Path, default=REPO_ROOT / "benchmarks/prompts/heldout_chat.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft", default=None, help="draft folder (default: duo's shipped default draft)")
    parser.add_argument("--target", default=None, help="target folder (default: duo's default target)")
    parser.add_argument("--budgets", default="2,4,6,8", help="comma-separated draft budgets k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args()


def read_prompts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with a KV cache, and the wall time of each single-token step after the prefill."""
    cache = DynamicCache()
    logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits
    tokens = [int(logits[0, -1].argmax())]
    step_times: list[float] = []
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        started = time.perf_counter()
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
        step_times.append(time.perf_counter() - started)
    return tokens, step_times


@torch.no_grad()
def agreement_counts(draft, prompt_ids: list[int], target_tokens: list[int]) -> tuple[int, int]:
    """(matches, positions): the draft's teacher-forced argmax against the target's continuation."""
    sequence = torch.tensor([prompt_ids + target_tokens[:-1]])
    draft_logits = draft(sequence).logits[0, len(prompt_ids) - 1:]
    draft_tokens = draft_logits.argmax(-1)
    matches = int((draft_tokens == torch.tensor(target_tokens)).sum())
    return matches, len(target_tokens)


class DraftProposer:
    """The draft with a KV cache over the committed prefix, proposing greedy continuations."""

    def __init__(self, draft, prompt_ids: list[int]):
        self.draft = draft
        self.cache = DynamicCache()
        self.cached = 0
        self.committed = list(prompt_ids)

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        logits = self.draft(torch.tensor([tokens]), past_key_values=self.cache, use_cache=True).logits
        self.cached += len(tokens)
        return logits[0, -1]

    def propose(self, count: int) -> list[int]:
        if count == 0:
            return []
        if self.cached < len(self.committed) - 1:
            self._feed(self.committed[self.cached:-1])
        logits = self._feed(self.committed[-1:])
        proposal = [int(logits.argmax())]
        while len(proposal) < count:
            proposal.append(int(self._feed(proposal[-1:]).argmax()))
        return proposal

    def commit(self, tokens: list[int]) -> None:
        self.committed.extend(tokens)
        keep = min(self.cached, len(self.committed) - 1)
        self.cache.crop(keep - self.cached)  # transformers 5: a negative count of tokens to drop
        self.cached = keep


def simulate_speculative(draft, prompt_ids: list[int], target_tokens: list[int], budget: int) -> tuple[int, int]:
    """(committed tokens, rounds) of greedy speculative decoding that reproduces ``target_tokens``."""
    proposer = DraftProposer(draft, prompt_ids)
    done, rounds = 0, 0
    while done < len(target_tokens):
        remaining = len(target_tokens) - done
        proposal = proposer.propose(min(budget, remaining - 1))
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == target_tokens[done + accepted]:
            accepted += 1
        committed = target_tokens[done:done + accepted + 1]
        proposer.commit(committed)
        done += len(committed)
        rounds += 1
    return done, rounds


def load_model(path: str, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def evaluate(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    target_path = args.target or str(default_target_dir())
    draft_path = args.draft or str(default_draft_dir())
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = load_model(target_path, torch.float32)
    draft = load_model(draft_path, "auto")
    budgets = [int(b) for b in args.budgets.split(",")]
    eos_id = tokenizer.eos_token_id
    prompts = read_prompts(args.prompts)

    matches = positions = 0
    committed = {k: 0 for k in budgets}
    rounds = {k: 0 for k in budgets}
    target_times: list[float] = []
    draft_times: list[float] = []
    for index, prompt in enumerate(prompts):
        prompt_ids = chat_ids(tokenizer, prompt)
        target_tokens, step_times = greedy_decode(target, prompt_ids, args.max_new_tokens, eos_id)
        target_times += step_times
        draft_times += greedy_decode(draft, prompt_ids, args.max_new_tokens, eos_id)[1]
        m, n = agreement_counts(draft, prompt_ids, target_tokens)
        matches, positions = matches + m, positions + n
        for k in budgets:
            c, r = simulate_speculative(draft, prompt_ids, target_tokens, k)
            committed[k] += c
            rounds[k] += r
        print(f"[{index + 1}/{len(prompts)}] {len(target_tokens)} tokens, agreement {m / n:.3f}: {prompt[:60]}",
              file=sys.stderr, flush=True)

    target_ms = 1000 * statistics.median(target_times)
    draft_ms = 1000 * statistics.median(draft_times)
    return {
        "target": target_path,
        "draft": draft_path,
        "draft_dtype": str(next(draft.parameters()).dtype).replace("torch.", ""),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "target_tokens": positions,
        "agreement": matches / positions,
        "mean_committed_per_round": {str(k): committed[k] / rounds[k] for k in budgets},
        "target_ms_per_token": target_ms,
        "draft_ms_per_token": draft_ms,
        "draft_over_target_time": draft_ms / target_ms,
    }


def print_table(result: dict) -> None:
    print(f"draft:  {result['draft']} ({result['draft_dtype']})")
    print(f"target: {result['target']} (float32)")
    print(f"{result['prompts']} held-out prompts, greedy, up to {result['max_new_tokens']} new tokens "
          f"({result['target_tokens']} target tokens), {result['threads']} thread(s)")
    print()
    print(f"{'metric':<44}{'value':>10}")
    print("-" * 54)
    print(f"{'per-token agreement (draft argmax = target)':<44}{result['agreement']:>10.3f}")
    for k, value in result["mean_committed_per_round"].items():
        print(f"{'mean tokens committed per round, k=' + k:<44}{value:>10.2f}")
    print(f"{'target ms per token (median)':<44}{result['target_ms_per_token']:>10.2f}")
    print(f"{'draft ms per token (median)':<44}{result['draft_ms_per_token']:>10.2f}")
    print(f"{'draft / target time per token':<44}{result['draft_over_target_time']:>10.3f}")


def main() -> None:
    args = parse_args()
    result = evaluate(args)
    print_table(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
