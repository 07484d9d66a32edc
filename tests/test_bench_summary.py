"""``duo-client bench``'s report: speed against the faster HF generate, identity against the float32 one."""

from duo.client.bench import Run, format_table, summarise


def run(system: str, prompt: int, tokens: list[int], seconds: float) -> Run:
    return Run(system, prompt, tokens, total_s=seconds, ttft_s=0.1)


def test_ratios_use_the_faster_hf_generate_and_bf16_is_not_held_to_float32_tokens():
    runs = [
        run("hf-generate", 0, [1, 2, 3, 4], 2.0),       # 2 tokens/s: the reference output
        run("hf-generate-bf16", 0, [1, 2, 9, 9], 1.0),  # 4 tokens/s: the speed base, other tokens
        run("duo-nospec", 0, [1, 2, 3, 4], 0.5),        # 8 tokens/s
        run("duo-auto", 0, [1, 2, 3, 5], 0.5),          # differs from the reference
    ]
    summaries = {s.system: s for s in summarise(runs, ["hf-generate", "hf-generate-bf16", "duo-nospec", "duo-auto"])}
    assert summaries["hf-generate"].ratio_to_hf_generate == 0.5
    assert summaries["hf-generate-bf16"].ratio_to_hf_generate == 1.0
    assert summaries["duo-nospec"].ratio_to_hf_generate == 2.0
    assert summaries["hf-generate-bf16"].identical_to_reference is None
    assert summaries["duo-nospec"].identical_to_reference is True
    assert summaries["duo-auto"].identical_to_reference is False
    table = format_table(list(summaries.values()))
    assert "n/a" in table and "NO" in table


def test_without_hf_generate_the_first_system_is_the_base():
    runs = [run("duo-nospec", 0, [1, 2], 1.0), run("duo-auto", 0, [1, 2], 0.5)]
    summaries = summarise(runs, ["duo-nospec", "duo-auto"])
    assert [s.ratio_to_hf_generate for s in summaries] == [1.0, 2.0]


def test_first_token_latency_is_reported_as_median_and_90th_percentile():
    runs = [Run("duo-auto", index, [1, 2], total_s=1.0, ttft_s=seconds)
            for index, seconds in enumerate([0.1, 0.5, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0])]
    (summary,) = summarise(runs, ["duo-auto"])
    assert summary.ttft_p50_s == 0.6 and summary.ttft_p90_s == 1.0
    assert "TTFT p50" in format_table([summary])
