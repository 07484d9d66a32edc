"""Options and start-up shared by ``duo-verify serve`` and ``duo-draft serve``."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import click

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def common_serve_options(env_prefix: str):
    """Options every service has; each also reads ``{env_prefix}_{NAME}`` from the environment."""

    def decorate(command):
        options = [
            click.option("--host", default="0.0.0.0", show_default=True, envvar=f"{env_prefix}_HOST",
                         help="Address to listen on."),
            click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True,
                         envvar=f"{env_prefix}_PORT", help="Port to listen on (0 picks a free one)."),
            click.option("--threads", type=click.IntRange(1, 512), default=None, envvar=f"{env_prefix}_THREADS",
                         help="torch CPU threads (default: torch's choice)."),
            click.option("--max-sessions", type=click.IntRange(1, 100000), default=64, show_default=True,
                         envvar=f"{env_prefix}_MAX_SESSIONS", help="Concurrent sessions before RESOURCE_EXHAUSTED."),
            click.option("--grace-s", type=click.FloatRange(0), default=30.0, show_default=True,
                         envvar=f"{env_prefix}_GRACE_S", help="Seconds in-flight sessions get to finish on SIGTERM."),
            click.option("--port-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         envvar=f"{env_prefix}_PORT_FILE", help="Write the bound port here once serving."),
            click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
                         show_default=True, envvar=f"{env_prefix}_LOG_LEVEL"),
        ]
        return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)

    return decorate


def setup_process(threads: int | None, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    if threads:
        import torch

        torch.set_num_threads(threads)


def announce_port(port_file: Path | None, port: int) -> None:
    """Write the bound port atomically, so a parent process can wait for the file."""
    if port_file is None:
        return
    staging = port_file.with_suffix(".tmp")
    staging.write_text(str(port))
    os.replace(staging, port_file)
