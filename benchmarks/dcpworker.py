"""One rank of a measured ``torch.distributed.checkpoint`` save or load (started by benchmarks/dcpbench.py).

    python -m benchmarks.dcpworker SPEC_JSON

Every rank of a step is one such process (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment); they join a ``gloo`` process group on 127.0.0.1 and build
their shards of one seeded state dict (:func:`state_dict`): model weights in float32 and
bfloat16 and Adam-like optimizer state (``exp_avg``, ``exp_avg_sq`` in float32, a ``step``
tensor and ``param_groups``), the large tensors ``DTensor``s sharded on dimension 0 over the
ranks, the small ones replicated. A load fills a state dict of the same shape whose tensors hold
-1 (every page touched, so it is resident before the clock starts) and then checks every value
against the seeded one, shard by shard.

The clock runs from a barrier before the operation to a barrier after it (so it is the slowest
rank's time). Memory: the peak resident set size during the operation (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) less the resident size right before it (interpreter,
libraries and the state dict itself): what the operation needs beyond the state dict. Each rank
writes ``{"wall", "cpu", "rss_before", "peak_beyond", "children_peak_rss", "verified"}`` to
``SPEC["result"] + ".rank<N>.json"``.

Operations (``SPEC["how"]``): ``ours`` (checkpointio.dcp), ``s3torch`` (s3torchconnector's
``S3StorageWriter`` / ``S3StorageReader``), ``fs_s5cmd`` (``FileSystemWriter`` to a local folder
then ``s5cmd cp``; for a load, ``s5cmd cp`` then ``FileSystemReader``), ``fsspec`` (DCP's
``FsspecWriter`` / ``FsspecReader`` over s3fs) and ``prepare`` (an unmeasured
``FileSystemWriter`` save that makes the bytes the ``s5cmd cp`` ceiling moves).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

Spec = dict[str, Any]
MiB = 1024 * 1024

#: Per layer: name -> (rows as a multiple of the model width, columns as a multiple, dtype).
LAYER = {
    "attn.qkv.weight": (3, 1, torch.float32),
    "attn.out.weight": (1, 1, torch.bfloat16),
    "mlp.up.weight": (4, 1, torch.float32),
    "mlp.down.weight": (1, 4, torch.bfloat16),
}


def layer_bytes(width: int) -> int:
    """Bytes one layer adds to the whole state dict: its weights plus two float32 moments each."""
    total = 0
    for rows, cols, dtype in LAYER.values():
        elements = rows * cols * width * width
        total += elements * (torch.finfo(dtype).bits // 8) + 2 * 4 * elements
    return total + 3 * 4 * width  # the norm, replicated, and its moments


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _noise(shape: tuple[int, ...], dtype: torch.dtype, *parts: object) -> torch.Tensor:
    """Seeded standard-normal noise, made directly in ``dtype`` (no float32 copy on the way)."""
    generator = torch.Generator().manual_seed(_seed(*parts))
    return torch.randn(shape, dtype=dtype, generator=generator)


def _shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows rank ``rank`` holds of a tensor of ``rows`` rows split on dimension 0 (as ``Shard(0)``)."""
    per = -(-rows // world)
    start = min(rows, rank * per)
    return start, min(rows, start + per) - start


def state_dict(width: int, layers: int, mesh: Any, *, fill: float | None = None) -> dict[str, Any]:
    """This rank's part of the seeded state dict (``fill``: every tensor holds it instead)."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def tensor(shape: tuple[int, ...], dtype: torch.dtype, sharded: bool, *name: object) -> torch.Tensor:
        if not sharded:
            return _noise(shape, dtype, *name) if fill is None else torch.full(shape, fill, dtype=dtype)
        _, count = _shard_rows(shape[0], rank, world)
        local_shape = (count, *shape[1:])
        local = _noise(local_shape, dtype, *name, rank) if fill is None else torch.full(local_shape, fill, dtype=dtype)
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())  # fmt: skip

    model: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(layers):
        for short, (rows, cols, dtype) in LAYER.items():
            name = f"layers.{layer}.{short}"
            shape = (rows * width, cols * width)
            model[name] = tensor(shape, dtype, True, "model", name)
            moments[name] = {
                "exp_avg": tensor(shape, torch.float32, True, "exp_avg", name),
                "exp_avg_sq": tensor(shape, torch.float32, True, "exp_avg_sq", name),
                "step": torch.full((), 1000.0) if fill is None else torch.full((), fill),
            }
        name = f"layers.{layer}.norm.weight"
        model[name] = tensor((width,), torch.float32, False, "model", name)
        moments[name] = {
            "exp_avg": tensor((width,), torch.float32, False, "exp_avg", name),
            "exp_avg_sq": tensor((width,), torch.float32, False, "exp_avg_sq", name),
            "step": torch.full((), 1000.0) if fill is None else torch.full((), fill),
        }
    groups = [{"lr": 3e-4 if fill is None else 0.0, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": sorted(model)}]
    return {"model": model, "optim": {"state": moments, "param_groups": groups}, "epoch": 7 if fill is None else -1}


def verify(loaded: dict[str, Any], width: int, layers: int, mesh: Any) -> None:
    """Compare every value of ``loaded`` with the seeded state dict (built again, same seeds)."""
    expected = state_dict(width, layers, mesh)
    mismatches: list[str] = []

    def walk(path: str, got: Any, want: Any) -> None:
        if isinstance(want, dict):
            for key in want:
                walk(f"{path}.{key}", got[key], want[key])
        elif isinstance(want, torch.Tensor):
            a = got.to_local() if isinstance(got, DTensor) else got
            b = want.to_local() if isinstance(want, DTensor) else want
            if a.dtype != b.dtype or not torch.equal(a, b):
                mismatches.append(path)
        elif got != want:
            mismatches.append(path)

    walk("", loaded, expected)
    if mismatches:
        rank = dist.get_rank()
        raise SystemExit(f"rank {rank}: {len(mismatches)} values differ after the load, e.g. {mismatches[:3]}")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _s5cmd(spec: Spec, *args: str) -> None:
    subprocess.run([spec["s5cmd"], "--endpoint-url", spec["endpoint"], "--log", "error", *args], check=True)


def _s3torch_filesystem(spec: Spec, reader_constructor: Any = None) -> Any:
    """s3torchconnector's file system pointed at the loopback server: its storage writer and
    reader build one from the region alone (virtual-hosted AWS addressing); the endpoint and
    path-style addressing only reach its client this way."""
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    client = S3Client(spec["region"], endpoint=spec["endpoint"], s3client_config=S3ClientConfig(force_path_style=True))
    return S3FileSystem(spec["region"], s3_client=client, reader_constructor=reader_constructor)


def _s3fs_options(spec: Spec) -> dict[str, Any]:
    """s3fs on the loopback server. ``rclone serve s3`` sends the whole object's CRC32 with every
    ranged GET, which botocore's default ``response_checksum_validation="when_supported"`` rejects
    (``FlexibleChecksumError``): s3fs must check response checksums only where required here."""
    return {"endpoint_url": spec["endpoint"], "config_kwargs": {"response_checksum_validation": "when_required"}}


def save(spec: Spec, state: dict[str, Any]) -> None:
    """Save ``state`` the way ``spec["how"]`` says."""
    how, uri = spec["how"], spec["uri"]
    if how == "ours":
        from checkpointio.dcp import StorageWriter

        dcp.save(state, storage_writer=StorageWriter(uri))
    elif how == "s3torch":
        from s3torchconnector.dcp import S3StorageWriter

        writer = S3StorageWriter(spec["region"], uri)
        writer.fs = _s3torch_filesystem(spec)
        writer.path = writer.fs.init_path(uri)
        dcp.save(state, storage_writer=writer)
    elif how == "fsspec":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        dcp.save(state, storage_writer=FsspecWriter(uri, **_s3fs_options(spec)))
    elif how in ("fs_s5cmd", "prepare"):
        local = Path(spec["local"])
        dcp.save(state, storage_writer=dcp.FileSystemWriter(local))
        dist.barrier()
        if how == "fs_s5cmd" and dist.get_rank() == 0:  # one machine: one s5cmd moves every rank's files
            _s5cmd(spec, "cp", f"{local}/", uri.rstrip("/") + "/")
    else:
        raise SystemExit(f"unknown save: {how}")


def load(spec: Spec, state: dict[str, Any]) -> None:
    """Load into ``state`` the way ``spec["how"]`` says."""
    how, uri = spec["how"], spec["uri"]
    if how == "ours":
        from checkpointio.dcp import StorageReader

        dcp.load(state, storage_reader=StorageReader(uri))
    elif how == "s3torch":
        from s3torchconnector.dcp import S3StorageReader

        reader = S3StorageReader(spec["region"], uri)
        reader.fs = _s3torch_filesystem(spec, reader._reader_constructor)
        reader.path = reader.fs.init_path(uri)
        dcp.load(state, storage_reader=reader)
    elif how == "fsspec":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        dcp.load(state, storage_reader=FsspecReader(uri, **_s3fs_options(spec)))
    elif how == "fs_s5cmd":
        local = Path(spec["local"])
        if dist.get_rank() == 0:
            _s5cmd(spec, "cp", uri.rstrip("/") + "/*", f"{local}/")
        dist.barrier()
        dcp.load(state, storage_reader=dcp.FileSystemReader(local))
    else:
        raise SystemExit(f"unknown load: {how}")


def main() -> None:
    """Join the group, build the state dict, run the operation between two barriers, report."""
    spec: Spec = json.loads(sys.argv[1])
    if os.environ.get("DCPBENCH_CHECKPOINTIO"):  # dcpbench.py --compare: another tree's checkpointio
        sys.path.insert(0, os.environ["DCPBENCH_CHECKPOINTIO"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    width, layers = spec["width"], spec["layers"]
    operation = spec["op"]
    state = state_dict(width, layers, mesh, fill=None if operation == "save" else -1.0)
    if spec["how"] == "ours":  # import what the operation needs before the baseline (as s3fs is below)
        import checkpointio._stores._s3
        import checkpointio.dcp  # noqa: F401
    if spec["how"] == "s3torch":
        import s3torchconnector.dcp  # noqa: F401
    if spec["how"] == "fsspec":
        import s3fs  # noqa: F401
    gc.collect()
    dist.barrier()
    rss_before = _status_kib("VmRSS") * 1024
    _reset_peak()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    (save if operation == "save" else load)(spec, state)
    dist.barrier()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_kib("VmHWM") * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    verified = False
    if operation == "load":
        verify(state, width, layers, mesh)
        verified = True
    result = {
        "wall": wall,
        "cpu": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "rss_before": rss_before,
        "peak_beyond": max(0, peak - rss_before),
        "children_peak_rss": children,
        "verified": verified,
        "state_bytes": _local_bytes(state),
    }
    Path(f"{spec['result']}.rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    if spec.get("local") and operation == "load" and spec["how"] == "fs_s5cmd" and rank == 0:
        shutil.rmtree(spec["local"], ignore_errors=True)


def _local_bytes(state: Any) -> int:
    """Bytes of tensor data this rank holds."""
    if isinstance(state, dict):
        return sum(_local_bytes(value) for value in state.values())
    if isinstance(state, DTensor):
        return state.to_local().nbytes
    if isinstance(state, torch.Tensor):
        return state.nbytes
    return 0


if __name__ == "__main__":
    main()
