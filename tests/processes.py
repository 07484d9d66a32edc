"""Processes seen through /proc (Linux): who a process's children are, and whether it still runs."""

from pathlib import Path

HAS_PROC = Path("/proc/self/stat").exists()


def parent_and_state(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := parent_and_state(int(entry.name))) and info[0] == pid:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    info = parent_and_state(pid)
    return info is not None and info[1] not in "ZX"  # a zombie has stopped; only its exit status is left


def processes_with(in_command: str, in_environment: str) -> list[int]:
    """Running processes whose command line holds ``in_command`` and whose environment holds ``in_environment``
    (e.g. ``NAME=VALUE``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command, environment = (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if in_command.encode() in command and in_environment.encode() in environment.split(b"\0"):
            found.append(int(entry.name))
    return [pid for pid in found if running(pid)]
