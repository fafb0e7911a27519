"""The thread counts a transfer starts by default follow the cores the process may use: its CPU
affinity (``taskset``) and its cgroups' CPU quota (a container's CPU limit), read from the files
Linux keeps for them (here laid out in a temporary folder as Linux lays them out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpointio import TransferConfig
from checkpointio._config import MAX_DEFAULT_WORKERS, codec_workers, receiving_workers
from checkpointio._cores import available, cgroup_limit

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    """A ``/proc/self`` with these ``cgroup`` and ``mountinfo`` contents."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    return proc


def cgroup_folder(path: Path, **files: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("_", ".", 1)).write_text(text + "\n")


def v2_mount(point: Path, root: str = "/") -> str:
    return f"30 23 0:26 {root} {point} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate"


def v1_mount(point: Path, controllers: str, root: str = "/") -> str:
    return f"33 25 0:29 {root} {point} rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,{controllers}"


def test_a_cgroup_v2_quota_caps_the_cores_and_one_set_above_the_process_cgroup_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounted = tmp_path / "sys" / "fs" / "cgroup"
    cgroup_folder(mounted / "kubepods" / "pod1", cpu_max="150000 100000")  # 1.5 CPUs for the pod
    cgroup_folder(mounted / "kubepods" / "pod1" / "box", cpu_max="max 100000")  # none of its own
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/box\n", [v2_mount(mounted)])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)  # a large host

    assert cgroup_limit(proc) == 1.5
    assert available(proc) == 2  # rounded up: 1.5 CPUs of time keep two threads busy three quarters of it


def test_a_cgroup_v1_quota_seen_from_inside_a_container_caps_the_cores_at_one(tmp_path: Path) -> None:
    mounted = tmp_path / "cpu,cpuacct"
    cgroup_folder(mounted, cpu_cfs_quota_us="50000", cpu_cfs_period_us="100000")
    # without a cgroup namespace the container's cgroup is the mount's root, named by its full path
    proc = fake_proc(
        tmp_path,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        [v1_mount(mounted, "cpu,cpuacct", root="/docker/abc"), v1_mount(tmp_path / "memory", "memory")],
    )

    assert cgroup_limit(proc) == 0.5
    assert available(proc) == 1


def test_the_smallest_quota_of_the_hierarchies_wins(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v1 = tmp_path / "my cpu"  # mountinfo escapes the space
    cgroup_folder(v2 / "job", cpu_max="400000 100000")
    cgroup_folder(v1, cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    cgroup_folder(v1 / "job", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    escaped = str(v1).replace(" ", "\\040")
    mounts = [v2_mount(v2), f"34 25 0:30 / {escaped} rw - cgroup cgroup rw,cpu"]
    proc = fake_proc(tmp_path, "1:cpu:/job\n0::/job\n", mounts)

    assert cgroup_limit(proc) == 3.0


@pytest.mark.parametrize(
    ("cgroup", "layout"),
    [
        pytest.param("0::/job\n", {"job": {"cpu_max": "max 100000"}}, id="v2 no quota"),
        pytest.param("1:cpu:/job\n", {"job": {"cpu_cfs_quota_us": "-1", "cpu_cfs_period_us": "100000"}}, id="v1 none"),
        pytest.param("0::/job\n", {"job": {}}, id="v2 without the cpu controller"),
        # a quota where the mount's folder would be mistaken for the process's cgroup
        pytest.param(
            "0::/elsewhere\n",
            {"": {"cpu_max": "100000 100000"}, "elsewhere": {"cpu_max": "100000 100000"}},
            id="the cgroup is not under the mount",
        ),
        pytest.param(
            "0::/../b\n",
            {"": {"cpu_max": "100000 100000"}, "b": {"cpu_max": "max 100000"}},
            id="the cgroup is outside the namespace root",
        ),
    ],
)
def test_no_quota_leaves_the_affinity(tmp_path: Path, cgroup: str, layout: dict[str, dict[str, str]]) -> None:
    mounted = tmp_path / "cg"
    mounted.mkdir()
    for name, files in layout.items():
        cgroup_folder(mounted / name, **files)
    root = "/job" if "elsewhere" in cgroup else "/"
    mounts = [v2_mount(mounted, root) if cgroup.startswith("0::") else v1_mount(mounted, "cpu")]
    proc = fake_proc(tmp_path, cgroup, mounts)

    assert cgroup_limit(proc) is None
    assert available(proc) == AFFINITY


def test_a_mount_root_is_matched_with_the_kernel_escapes_decoded(tmp_path: Path) -> None:
    mounted = tmp_path / "cpu"
    cgroup_folder(mounted, cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    # /proc/self/cgroup prints the path as it is; mountinfo escapes a space as \\040, \\ as \\134
    path = "/system.slice/my job-x\\x2dy.scope"
    root = path.replace("\\", "\\134").replace(" ", "\\040")
    proc = fake_proc(tmp_path, f"3:cpu:{path}\n", [v1_mount(mounted, "cpu", root=root)])

    assert cgroup_limit(proc) == 1.0


def test_names_that_are_not_utf8_are_no_error(tmp_path: Path) -> None:
    mounted = tmp_path / "cg"
    cgroup_folder(mounted / "job", cpu_max="200000 100000")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_bytes(b"0::/job\n")
    latin1_mount = b"40 23 8:1 / /media/usb-\xe9t\xe9 rw - vfat /dev/sdb1 rw\n"
    (proc / "mountinfo").write_bytes(latin1_mount + v2_mount(mounted).encode() + b"\n")

    assert cgroup_limit(proc) == 2.0


def test_no_cgroup_files_leave_the_affinity(tmp_path: Path) -> None:
    assert cgroup_limit(tmp_path / "no-proc") is None
    assert available(tmp_path / "no-proc") == AFFINITY


def test_unset_worker_counts_are_the_cores_compression_workers_at_most_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("checkpointio._cores.available", lambda: 64)
    assert (codec_workers(TransferConfig()), receiving_workers(TransferConfig())) == (MAX_DEFAULT_WORKERS, 64)
    assert MAX_DEFAULT_WORKERS == 8


def test_set_worker_counts_are_used_as_they_are() -> None:
    config = TransferConfig(compression_workers=3, receive_workers=5)
    assert (codec_workers(config), receiving_workers(config)) == (3, 5)
    with pytest.raises(ValueError, match="compression_workers must be at least 1, got 0"):
        TransferConfig(compression_workers=0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_unset_worker_counts_follow_the_cpus_a_process_may_run_on() -> None:
    # in a child: the affinity is the process's, and this one's is left alone
    code = (
        "import json, os\n"
        "from checkpointio import TransferConfig\n"
        "from checkpointio._config import codec_workers, receiving_workers\n"
        "was = os.sched_getaffinity(0)\n"
        "os.sched_setaffinity(0, {min(was)})\n"
        "one = [codec_workers(TransferConfig()), receiving_workers(TransferConfig())]\n"
        "os.sched_setaffinity(0, was)\n"
        "print(json.dumps([one, codec_workers(TransferConfig())]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    one, every = json.loads(done.stdout)
    assert one == [1, 1]
    assert every == min(MAX_DEFAULT_WORKERS, available())


def test_the_quota_is_read_once_per_process_the_affinity_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transfers ask on the event loop: the files are read at the first one only
    mounted = tmp_path / "cg"
    cgroup_folder(mounted / "job", cpu_max="300000 100000")
    proc = fake_proc(tmp_path, "0::/job\n", [v2_mount(mounted)])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert available(proc) == 3
    (mounted / "job" / "cpu.max").write_text("100000 100000\n")
    assert available(proc) == 3
    assert cgroup_limit(proc) == 1.0  # read again when asked for directly
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert available(proc) == 1
