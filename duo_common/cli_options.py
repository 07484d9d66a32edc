"""Command-line vocabulary the three CLIs share (duo-client, duo-draft, duo-verify).

Kept apart from the service start-up (``serve_cli``) and the CPU runtime (``cpu_runtime``), which import
gRPC servers and torch: ``duo-client generate`` offers these options too, and a call to a running pair must
not pay for those imports."""

from __future__ import annotations

import click

from duo.common.budget import parse_budget

KERNEL_CHOICES = ("auto", "packed", "torch")
KERNELS_HELP = ("CPU matrix kernels: packed (duo's few-row kernel: verifying k tokens costs about as much as one), "
                "torch, or auto (packed for a float32 model where the CPU has AVX-512 or AVX2 with FMA).")


def budget_option(ctx, param, value: str) -> int | None:
    """A click callback for a draft-budget flag: ``auto`` → None (the latency-aware controller), else a number
    of draft tokens (``duo.common.budget.parse_budget``)."""
    try:
        return parse_budget(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
