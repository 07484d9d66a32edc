"""The first minute of a user: how long one short ``duo-client generate`` takes from the shell, against a plain
script that does the same work with transformers alone.

Three wall times, each a whole process from start to exit:
  plain      ``python -c``: import transformers, load the target, greedy-generate the same new tokens
  cold       ``duo-client generate`` with no pair up: it starts both services, waits for them, generates, stops them
  resident   ``duo-client generate`` while ``duo-client up``'s pair runs (started before, stopped after)
and the ratios cold / plain and resident / plain. Plain and cold alternate, ``--repeats`` times each, and the
medians are printed (drift in machine load hits both alike); one untimed cold call first fills what a user's
first call leaves behind (the converted default target, the services' self-check verdicts, the OS file cache).
Run it on a quiet machine: the load average is printed before and after.

    python benchmarks/first_call.py                      # the default pair, 8 new tokens after "hi"
    python benchmarks/first_call.py --repeats 5 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from duo.client import resident
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET, resolve_model

# The plain script: what a user would write with transformers alone (the prompt through the chat template, as
# duo-client does for a model that has one; greedy, like duo-client's default).
PLAIN_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
print(tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default=DEFAULT_TARGET)
    parser.add_argument("--draft-model", default=DEFAULT_DRAFT)
    parser.add_argument("--prompt", default="hi")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of plain and cold each (median)")
    return parser.parse_args()


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a whole process, and what it printed; a failure ends the benchmark with its stderr."""
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall_s = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(command[:4])}... failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return wall_s, completed.stdout.strip()


def main() -> None:
    args = parse_args()
    if resident.current() is not None:
        sys.exit("a resident pair is up: duo-client down first (the cold call must start its own)")
    target_path = resolve_model(args.target_model)  # converts the default target here, untimed, if never done
    client = [sys.executable, "-m", "duo.client.cli"]
    models = ["--target-model", args.target_model, "--draft-model", args.draft_model]
    generate = [*client, "generate", *models, "--quiet", "--max-new-tokens", str(args.max_new_tokens), args.prompt]
    plain = [sys.executable, "-c", PLAIN_SCRIPT, target_path, args.prompt, str(args.max_new_tokens)]

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    timed(generate)  # untimed: what a first call leaves behind
    plain_s, cold_s = [], []
    for _ in range(args.repeats):
        seconds, plain_text = timed(plain)
        plain_s.append(seconds)
        seconds, cold_text = timed(generate)
        cold_s.append(seconds)

    timed([*client, "up", *models, "--quiet"])
    try:
        resident_s = [timed(generate)[0] for _ in range(args.repeats)]
    finally:
        timed([*client, "down"])

    plain_median, cold_median = statistics.median(plain_s), statistics.median(cold_s)
    resident_median = statistics.median(resident_s)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.max_new_tokens} new tokens after {args.prompt!r}; medians of {args.repeats} runs")
    print(f"  plain script     {plain_median:6.2f} s   {_runs(plain_s)}   text: {plain_text!r}")
    print(f"  cold generate    {cold_median:6.2f} s   {_runs(cold_s)}   text: {cold_text!r}")
    print(f"  resident pair    {resident_median:6.2f} s   {_runs(resident_s)}")
    print(f"cold / plain     {cold_median / plain_median:.2f}×")
    print(f"resident / plain {resident_median / plain_median:.2f}×")


def _runs(seconds: list[float]) -> str:
    return "(" + ", ".join(f"{value:.2f}" for value in seconds) + ")"


if __name__ == "__main__":
    main()
