"""Tiny launcher between the runner and a measured step: ``python -I -S launch.py RESULT ARGV...``.

Linux records a process's peak RSS across ``exec`` from the image it was forked from, so a step
started directly by the runner (which holds the datasets' manifests and numpy) would inherit the
runner's peak. This launcher starts small (about 8 MiB: no site, nothing imported before the
spawn), spawns the step, reaps it with ``os.wait4`` and writes its wall time, CPU time and peak
RSS (the largest process of the step's tree; never below the launcher's own ~8 MiB) to RESULT as
JSON. It exits with the step's status.
"""

import os
import sys
import time


def main() -> None:
    """Spawn ``sys.argv[2:]``, wait for it, write the measurements to ``sys.argv[1]``."""
    result, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    import json  # only now: imports before the spawn would raise the floor of every measurement

    with open(result, "w") as out:
        json.dump({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}, out)
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
