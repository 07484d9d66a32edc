"""Fault injection on loopback: generations go on while the verify service and the draft service are killed
(SIGKILL) and restarted, and the verifier is paused (SIGSTOP, then SIGCONT), at random moments.

Every generation (greedy, through duo-client's orchestrator, which resumes after losing its draft service;
the draft service resumes after losing its verifier) is compared token for token with the same prompt run
without faults: the benchmark counts tokens lost and duplicated. Then, without faults, it runs many short
sessions (a third cancelled by the client after their first token) and reports both services' resident
memory after the first hundred and at the end.

    python benchmarks/chaos.py --kills 20 --sessions 1000

Loopback only; bounded by --kills (of each service) and --sessions. Exits non-zero when a generation failed,
lost or duplicated a token, or memory grew by more than 10 %.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import json
import logging
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from duo.client.embedded import ChildService
from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET
from duo.common.params import StoppingParams
from duo.common.prompt_sets import read_prompt_file
from duo.common.resume import ResumePolicy
from duo.common.security import ChannelSecurity

PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout_chat.jsonl"
RESUME = ResumePolicy(attempts=8, within_s=120.0)  # a restart takes seconds: imports and the model load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Pair:
    """The two services as child processes on fixed ports, so a restarted one is found where it was."""

    def __init__(self, work: Path, target: str, draft: str):
        self.work, self.target, self.draft = work, target, draft
        self.verify_port, self.draft_port = free_port(), free_port()
        self.verify: ChildService | None = None
        self.drafter: ChildService | None = None

    @property
    def draft_addr(self) -> str:
        return f"127.0.0.1:{self.draft_port}"

    def start_verify(self) -> None:
        self.verify = ChildService.start("verify", [
            "duo.verify_service.cli", "serve", "--model", self.target, "--threads", "1", "--device", "cpu"],
            self.work, port=self.verify_port)

    def start_draft(self) -> None:
        self.drafter = ChildService.start("draft", [
            "duo.draft_service.cli", "serve", "--model", self.draft, "--threads", "1",
            "--verify-addr", f"127.0.0.1:{self.verify_port}",
            "--verifier-resume-attempts", str(RESUME.attempts),
            "--verifier-resume-within-s", str(RESUME.within_s)], self.work, port=self.draft_port)

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        self.verify.wait_healthy(f"127.0.0.1:{self.verify_port}", deadline)
        self.drafter.wait_healthy(self.draft_addr, deadline)

    def stop(self) -> None:
        for child in (self.drafter, self.verify):
            if child is not None:
                child.process.send_signal(signal.SIGCONT)
                child.stop()


@dataclass
class Tally:
    faults: dict[str, int] = field(default_factory=lambda: {"verify-kill": 0, "draft-kill": 0, "verify-pause": 0})
    completed: int = 0
    failed: list[str] = field(default_factory=list)  # after their first token: a lost generation
    refused: int = 0  # before their first token (the draft service was down): nothing delivered, nothing lost
    lost: int = 0
    duplicated: int = 0
    resumes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def inject_faults(pair: Pair, kills: int, tally: Tally, rng: random.Random, done: threading.Event) -> None:
    """Until each service was killed ``kills`` times: wait a moment, then kill one (and restart it at once)
    or pause the verifier for a moment."""
    while tally.faults["verify-kill"] < kills or tally.faults["draft-kill"] < kills:
        time.sleep(rng.uniform(0.5, 3.0))
        choices = [name for name in ("verify-kill", "draft-kill") if tally.faults[name] < kills] + ["verify-pause"]
        fault = rng.choice(choices)
        if fault == "verify-pause":
            pair.verify.process.send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(0.5, 3.0))
            pair.verify.process.send_signal(signal.SIGCONT)
        elif fault == "verify-kill":
            pair.verify.kill()
            pair.start_verify()
        else:
            pair.drafter.kill()
            pair.start_draft()
        tally.faults[fault] += 1
        pair.wait_serving()
        print(f"  {fault:<13} {json.dumps(tally.faults)}", flush=True)
    done.set()


def differences(delivered: list[int], expected: list[int]) -> tuple[int, int]:
    """Tokens lost (expected, not delivered) and duplicated or stray (delivered, not expected)."""
    lost = extra = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=expected, b=delivered, autojunk=False).get_opcodes():
        if tag in ("delete", "replace"):
            lost += i2 - i1
        if tag in ("insert", "replace"):
            extra += j2 - j1
    return lost, extra


def generate(orchestrator: Orchestrator, prompt: str, max_new_tokens: int, on_text=lambda text: None):
    request = GenerationRequest(prompt_text=prompt, stopping=StoppingParams(max_new_tokens=max_new_tokens))
    return orchestrator.generate(request, FixedBudget(3, 3), on_text)


def run_under_faults(pair: Pair, prompts: list[str], references: dict[str, list[int]], args, tally: Tally) -> None:
    done = threading.Event()
    rng = random.Random(args.seed)
    faults = threading.Thread(target=inject_faults, args=(pair, args.kills, tally, rng, done), daemon=True)
    faults.start()

    def client(index: int) -> None:
        with ChannelSecurity().channel(pair.draft_addr) as channel:
            orchestrator = Orchestrator(channel, timeout_s=600, resume=RESUME)
            turn = index
            while not done.is_set():
                prompt = prompts[turn % len(prompts)]
                turn += args.concurrency
                received = []
                try:
                    result = generate(orchestrator, prompt, args.max_new_tokens, received.append)
                except grpc.RpcError as exc:
                    with tally.lock:
                        if received:
                            tally.failed.append(f"{exc.code().name}: {exc.details()}")
                        else:
                            tally.refused += 1
                    time.sleep(1.0)  # not a tight loop of refusals
                    continue
                lost, extra = differences(result.token_ids, references[prompt])
                with tally.lock:
                    tally.completed += 1
                    tally.lost += lost
                    tally.duplicated += extra
                    tally.resumes += result.drafter_resumes + result.server_stats.verifier_resumes

    clients = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    faults.join()


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_many_sessions(pair: Pair, prompts: list[str], sessions: int, concurrency: int) -> list[tuple[int, float, float]]:
    """``sessions`` short sessions, a third cancelled after their first token; (sessions done, verifier MB,
    drafter MB) after the first hundred and at the end."""
    counter = iter(range(sessions))
    lock = threading.Lock()
    samples = []
    finished = [0]

    def client() -> None:
        with ChannelSecurity().channel(pair.draft_addr) as channel:
            orchestrator = Orchestrator(channel, timeout_s=120)
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                prompt = prompts[index % len(prompts)]
                if index % 3 == 0:  # cancelled by the client after its first token
                    request = GenerationRequest(prompt_text=prompt, stopping=StoppingParams(max_new_tokens=64))
                    try:
                        orchestrator.generate(request, FixedBudget(3, 3), on_text=_hang_up)
                    except _HungUp:
                        pass
                else:
                    generate(orchestrator, prompt, 16)
                with lock:
                    finished[0] += 1
                    if finished[0] in (100, sessions):
                        samples.append((finished[0], resident_mb(pair.verify.process.pid),
                                        resident_mb(pair.drafter.process.pid)))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


class _HungUp(Exception):
    pass


def _hang_up(text: str) -> None:
    raise _HungUp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of each service")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions of the memory phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-model", default=DEFAULT_TARGET)
    parser.add_argument("--draft-model", default=DEFAULT_DRAFT)
    args = parser.parse_args()
    logging.getLogger("duo.client.orchestrator").setLevel(logging.ERROR)  # each resume attempt's warning: counted below
    prompts = read_prompt_file(PROMPTS)
    with tempfile.TemporaryDirectory(prefix="duo-chaos-") as work:
        pair = Pair(Path(work), args.target_model, args.draft_model)
        try:
            pair.start_verify()
            pair.start_draft()
            pair.wait_serving()
            with ChannelSecurity().channel(pair.draft_addr) as channel:
                orchestrator = Orchestrator(channel, timeout_s=600)
                references = {prompt: generate(orchestrator, prompt, args.max_new_tokens).token_ids
                              for prompt in prompts}
            print(f"faults: {args.kills} kills of each service, verifier pauses between; "
                  f"{args.concurrency} clients generating", flush=True)
            tally = Tally()
            started = time.monotonic()
            run_under_faults(pair, prompts, references, args, tally)
            print(f"\nfaults injected       {json.dumps(tally.faults)} in {time.monotonic() - started:.0f} s")
            print(f"generations completed {tally.completed}, failed after their first token {len(tally.failed)}")
            for reason, count in collections.Counter(tally.failed).most_common():
                print(f"  {count} x {reason}")
            print(f"refused at the start  {tally.refused} (the draft service was down; nothing delivered)")
            print(f"tokens lost           {tally.lost}")
            print(f"tokens duplicated     {tally.duplicated}")
            print(f"resumes               {tally.resumes}")
            samples = run_many_sessions(pair, prompts, args.sessions, args.concurrency)
        finally:
            pair.stop()
    for done, verify_mb, draft_mb in samples:
        print(f"resident MB after {done:>5} sessions: verify {verify_mb:7.1f}, draft {draft_mb:7.1f}")
    growth = max(end / start for start, end in zip(samples[0][1:], samples[-1][1:]))
    print(f"memory growth from session 100 to {samples[-1][0]}: {100 * (growth - 1):+.1f} %")
    if tally.failed or tally.lost or tally.duplicated or growth > 1.10:
        sys.exit(1)


if __name__ == "__main__":
    main()
