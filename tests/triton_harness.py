"""Test helpers around the real tritonserver: the server process itself, and /proc inspection of what it leaves."""

from __future__ import annotations

from pathlib import Path

from tools.server_process import TritonServer, free_ports

__all__ = ["TritonServer", "descendants", "free_ports", "pid_alive"]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc, so it works for grandchildren like the backend stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.add(child)
            frontier.append(child)
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
