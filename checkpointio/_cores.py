"""How many CPUs this process may keep busy: what the thread counts a transfer starts by default
are sized by.

The CPU affinity (``taskset``, a cpuset) says which CPUs a process may run on; a cgroup's CPU
quota (a container's ``--cpus``, a Kubernetes pod's CPU limit) caps how much of them it may use,
and the affinity does not show it: a pod limited to 2 CPUs on a 64-core node sees 64. Threads
beyond the quota only take turns and get throttled.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

__all__ = ["available", "cgroup_limit"]


def available(proc: Path = Path("/proc/self")) -> int:
    """The CPUs this process may run on (its affinity, asked each time), at most its cgroups' CPU
    quota rounded up (read once: it is files to read, and transfers ask on the event loop), at
    least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        cores = os.cpu_count() or 1
    limit = _quota(proc)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


@functools.lru_cache(maxsize=4)
def _quota(proc: Path) -> float | None:
    """:func:`cgroup_limit`, read once per ``proc``."""
    return cgroup_limit(proc)


def cgroup_limit(proc: Path = Path("/proc/self")) -> float | None:
    """The CPUs' worth of time the cgroups of the process ``proc`` describes may use (the
    smallest quota / period of its cgroup and the cgroups above it, v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``), or ``None`` where none is set or none can be read (not Linux, no
    cgroup file system mounted). Anything it cannot make sense of counts as no limit."""
    try:
        # the kernel prints names as they are: not necessarily UTF-8
        memberships = (proc / "cgroup").read_text(errors="surrogateescape").splitlines()
        mounts = (proc / "mountinfo").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return None
    limits = []
    for line in memberships:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:
            where, read = _mounted(mounts, path, "cgroup2", None), _v2_limit
        elif "cpu" in controllers.split(","):
            where, read = _mounted(mounts, path, "cgroup", "cpu"), _v1_limit
        else:
            continue
        if where is None:  # not mounted, or the cgroup is out of sight (see _mounted)
            continue
        top, folder = where
        for level in (folder, *folder.parents):  # a limit set on a cgroup above applies too
            limit = read(level)
            if limit is not None:
                limits.append(limit)
            if level == top:
                break
    return min(limits) if limits else None


def _mounted(mounts: list[str], path: str, kind: str, controller: str | None) -> tuple[Path, Path] | None:
    """Where the hierarchy ``kind`` (with ``controller``, for v1) is mounted and the folder of its
    cgroup ``path`` there, from ``/proc/self/mountinfo`` lines; ``None`` if it is not mounted or
    the mount does not reach the cgroup. (A container sees its own cgroup as the mount's root.)

    A process that left the root of its cgroup namespace sees its cgroup as ``/../name``, and one
    whose namespace still sees the outer mount sees ``/../..`` as the mount's root: neither can
    be found among the folders mounted, so neither is looked for (as Go's runtime does)."""
    if ".." in path.split("/"):
        return None
    for line in mounts:
        fields = line.split()
        try:
            root, point = _unescaped(fields[3]), _unescaped(fields[4])
            after = fields[fields.index("-") + 1 :]
        except (IndexError, ValueError):
            continue
        if len(after) < 3 or after[0] != kind:
            continue
        if controller is not None and controller not in after[2].split(","):
            continue
        base = root.rstrip("/")
        if path == root:
            inside = ""
        elif path.startswith(base + "/"):
            inside = path[len(base) + 1 :]
        else:
            continue
        top = Path(point)
        return top, top / inside.strip("/")
    return None


def _unescaped(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def _v2_limit(folder: Path) -> float | None:
    """``cpu.max`` of one cgroup ("max 100000" or "200000 100000") in CPUs, ``None`` if unlimited."""
    try:
        quota, _, period = (folder / "cpu.max").read_text().partition(" ")
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(folder: Path) -> float | None:
    """``cpu.cfs_quota_us / cpu.cfs_period_us`` of one cgroup in CPUs, ``None`` if unlimited (-1)."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None
