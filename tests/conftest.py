"""Fixtures: one behavioural suite over every store (``store``), plus tree helpers."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from checkpointio import TransferOptions
from checkpointio._cli import _Formatter
from checkpointio._placement import remove_tree
from checkpointio._stores import _memory as memory_store

from .faultproxy import Fault, FaultProxy, Match

STORES = ["local", "memory", "s3"]
#: For behaviour in which the store plays no part (archive safety, symlinks, workspaces, argument
#: checks): run on one store, not every one. What each store must do is test_store_contract.py.
ONE_STORE = pytest.mark.parametrize("store", ["memory"], indirect=True)

# A shell starts background jobs with SIGINT ignored, and a child inherits that: Python then never
# turns Ctrl-C into KeyboardInterrupt, and the tests that interrupt a save or load would see the
# transfer finish instead. Catching SIGINT here gives every child the default disposition back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """The command line sets up logging for its process (a handler on the root logger, levels for
    ``checkpointio`` and the root, ``-q`` silencing warnings): a test that runs ``main()`` in this
    process must not change what the tests after it see in ``caplog``."""
    root, ours = logging.getLogger(), logging.getLogger("checkpointio")
    levels = root.level, ours.level
    handlers = set(root.handlers)
    yield
    root.setLevel(levels[0])
    ours.setLevel(levels[1])
    for handler in [one for one in root.handlers if one not in handlers and isinstance(one.formatter, _Formatter)]:
        root.removeHandler(handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoServer:
    """moto in server mode: a real S3 endpoint over HTTP on 127.0.0.1, in its own process."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


def start_moto(env: dict[str, str] | None = None) -> MotoServer:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)
    return MotoServer(endpoint, process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the session; credentials and endpoint reach the library the standard way."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = start_moto()
    os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint
    try:
        yield server
    finally:
        stop(server.process)
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class GuardedS3:
    """A moto server that enforces the IAM policies of the users it made (:func:`guarded_s3`).

    moto names listing actions by operation (``s3:ListObjectsV2``) where IAM has
    ``s3:ListBucket``; a HEAD is ``s3:GetObject`` in both. :data:`LISTING` grants either.
    """

    endpoint: str
    admin: dict[str, str]  # the environment of a user allowed everything

    #: Listing objects and unfinished uploads, under both names.
    LISTING = ("s3:ListBucket", "s3:ListObjectsV2", "s3:ListMultipartUploads", "s3:ListBucketMultipartUploads")

    def client(self, service: str, keys: dict[str, str]) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        )

    def principal(self, name: str, actions: Iterable[str], keys: dict[str, str] | None = None) -> dict[str, str]:
        """A new user allowed only ``actions`` (on every resource): the environment that signs as it."""
        iam = self.client("iam", keys or self.admin)
        iam.create_user(UserName=name)
        statement = {"Effect": "Allow", "Action": list(actions), "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def new_bucket(self) -> str:
        bucket = f"guarded-{uuid.uuid4().hex[:16]}"
        self.client("s3", self.admin).create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def guarded_s3() -> Iterator[GuardedS3]:
    """One IAM-enforcing moto server for the session, with its admin user (its first three
    requests, which make that user, are the only ones not checked)."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        guarded = GuardedS3(server.endpoint, {})
        nobody = {"AWS_ACCESS_KEY_ID": "unused", "AWS_SECRET_ACCESS_KEY": "unused"}
        guarded.admin = guarded.principal("admin", ["*"], keys=nobody)
        yield guarded
    finally:
        stop(server.process)


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's moto server: pass ``endpoint_url=proxy.endpoint``."""
    server = FaultProxy(("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1])))
    yield server
    server.close()


@dataclass
class ProxiedBucket:
    """A bucket on the session's moto server, reached through the fault proxy: saves to it fail or
    hang for real (a refused or unanswered request), through the public API."""

    moto: MotoServer
    proxy: FaultProxy
    bucket: str

    @property
    def options(self) -> TransferOptions:
        """The transfer options that send a checkpoint's requests through the proxy."""
        return {"endpoint_url": self.proxy.endpoint}

    def uri(self, key: str = "ckpt") -> str:
        return f"s3://{self.bucket}/{key}"

    def stored(self, key: str = "ckpt") -> bytes | None:
        """What the bucket holds at ``key`` (read past the proxy), ``None`` if nothing."""
        listed = self.moto.client().list_objects_v2(Bucket=self.bucket, Prefix=key).get("Contents", [])
        if not any(item["Key"] == key for item in listed):
            return None
        return bytes(self.moto.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def upload_of(self, key: str, nth: int = 1) -> Match:
        """Matches the uploads of ``key`` (a small save's one PUT), from the ``nth`` one it is asked about on."""
        seen = 0

        def match(method: str, target: str) -> bool:
            nonlocal seen
            if method == "PUT" and target.partition("?")[0] == f"/{self.bucket}/{key}":
                seen += 1
                return seen >= nth
            return False

        return match

    def refuse_upload(self, key: str = "ckpt", nth: int = 1, times: int = 1) -> Fault:
        """The ``nth`` upload of ``key`` (and ``times - 1`` after it) is refused (403): its save
        fails with AccessDeniedError."""
        return self.proxy.add(self.upload_of(key, nth), "403", times)

    def stall_upload(self, key: str = "ckpt") -> Fault:
        """The next upload of ``key`` is taken and never answered (until the proxy closes): its save
        stays in flight until cancelled. Wait on the fault's ``taken`` to know it got that far."""
        self.proxy.stall_seconds = 600
        return self.proxy.add(self.upload_of(key), "stall")


@pytest.fixture
def proxied_bucket(moto_server: MotoServer, proxy: FaultProxy) -> ProxiedBucket:
    return ProxiedBucket(moto_server, proxy, moto_server.new_bucket())


@dataclass
class StoreCase:
    """One store under test: makes URIs and reaches behind the library to inspect or damage objects."""

    name: str
    root: Path
    s3: MotoServer | None = None
    bucket: str = ""
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex)

    def uri(self, name: str) -> str:
        if self.name == "local":
            return str(self.root / name)
        if self.name == "s3":
            return f"s3://{self.bucket}/{self.prefix}/{name}"
        return f"memory://{self.prefix}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def put_raw(self, name: str, data: bytes) -> None:
        """Store bytes as another tool would: no checkpointio record."""
        if self.s3 is not None:
            self.s3.client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        elif self.name == "local":
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            from checkpointio._location import parse_location

            memory_store.write_raw(parse_location(self.uri(name)), data)

    def get_raw(self, name: str) -> bytes:
        if self.s3 is not None:
            return bytes(self.s3.client().get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read())
        if self.name == "local":
            return (self.root / name).read_bytes()
        from checkpointio._location import parse_location

        return memory_store.read_raw(parse_location(self.uri(name)))[0]

    def corrupt(self, name: str) -> None:
        """Flip bytes in the middle of the stored object, keeping its size and record."""
        if self.s3 is not None:
            client = self.s3.client()
            stored = client.get_object(Bucket=self.bucket, Key=self._key(name))
            data = bytearray(stored["Body"].read())
            middle = len(data) // 2
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
            client.put_object(Bucket=self.bucket, Key=self._key(name), Body=bytes(data), Metadata=stored["Metadata"])
        elif self.name == "local":
            path = self.root / name
            st = path.stat()
            data = bytearray(path.read_bytes())
            middle = len(data) // 2
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
            path.write_bytes(bytes(data))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # keep the record matching
        else:
            from checkpointio._location import parse_location

            location = parse_location(self.uri(name))
            stored, info = memory_store.read_raw(location)
            data = bytearray(stored)
            middle = len(data) // 2
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
            memory_store.write_raw(location, bytes(data), info)

    def list_names(self, prefix: str) -> list[str]:
        """Names of the stored objects below ``prefix`` (relative to it), as the store lists them."""
        import anyio

        from checkpointio._config import TransferConfig
        from checkpointio._location import parse_location
        from checkpointio._stores import open_store

        location = parse_location(self.uri(prefix))

        async def listing() -> list[Any]:
            return await (await open_store(location.scheme, TransferConfig())).list(location)

        infos = anyio.run(listing)
        base = location.key.rstrip("/") + "/"
        return [info.location.key[len(base) :] for info in infos if info.location.key.startswith(base)]

    def abandon_save(self, name: str) -> bool:
        """Leave what a save killed part-way leaves (an open multipart upload, a temporary file);
        ``False`` where a store never has one (memory: a save is one assignment)."""
        if self.s3 is not None:
            self.s3.client().create_multipart_upload(Bucket=self.bucket, Key=self._key(name))
            return True
        if self.name == "local":
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:16]}").write_bytes(b"half a save")
            return True
        return False

    def partial_writes(self) -> int | None:
        """How many saves are visibly in progress, or None where the store cannot show it."""
        if self.s3 is not None:
            return len(self.s3.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))
        if self.name == "local":
            return sum(1 for path in self.root.rglob(".*.partial-*"))
        return None


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreCase]:
    root = tmp_path / "store"
    root.mkdir()
    if request.param == "s3":
        server: MotoServer = request.getfixturevalue("moto_server")
        case = StoreCase("s3", root, s3=server, bucket=server.new_bucket())
        yield case
        assert case.partial_writes() == 0, "a test left an incomplete multipart upload behind"
    else:
        yield StoreCase(request.param, root)


def age_keeping_records(path: Path, when: float) -> None:
    """Set ``path``'s times to ``when`` (a symlink itself, not its target) as a run that ended then
    left it; a local checkpoint's record (its sidecar names the file's size and mtime) is moved
    along, so the file stays one checkpointio wrote: else ``rm`` and retention would keep it as a
    user's file."""
    sidecar = path.with_name(f".{path.name}.checkpointio")
    if path.is_symlink() or not sidecar.is_file() or path.name.endswith(".checkpointio"):
        os.utime(path, (when, when), follow_symlinks=False)
        return
    st = path.stat()
    doc = json.loads(sidecar.read_bytes())
    os.utime(path, (when, when))
    new = path.stat().st_mtime_ns
    for entry in [doc, *doc.get("also", [])]:
        if entry["of"] == [st.st_size, st.st_mtime_ns]:
            entry["of"] = [st.st_size, new]
    sidecar.write_text(json.dumps(doc))
    os.utime(sidecar, (when, when))


def make_tree(root: Path) -> Path:
    """A directory with nested folders, an empty folder, a symlink, binary content and modes."""
    (root / "model" / "layers").mkdir(parents=True)
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "model" / "layers" / "0.txt").write_text("layer zero\n" * 1000)
    (root / "zero-bytes").write_bytes(b"")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "private").write_text("secret")
    (root / "private").chmod(0o600)
    (root / "latest").symlink_to("model/weights.bin")
    (root / "model" / "up").symlink_to("../run.sh")
    os.utime(root / "model" / "layers" / "0.txt", (1_600_000_000, 1_600_000_000))
    return root


def snapshot(root: Path) -> dict[str, tuple[str, object, int, int]]:
    """What a restored tree must equal: kind, content or link target, mode and mtime of each entry."""
    result: dict[str, tuple[str, object, int, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path), 0, 0)
        elif path.is_dir():
            result[rel] = ("dir", None, st.st_mode & 0o777, 0)
        else:
            result[rel] = ("file", path.read_bytes(), st.st_mode & 0o777, int(st.st_mtime))
    return result


def pull_of(chunks: Iterable[bytes]) -> Callable[[], list[bytes]]:
    """A stream as the archive reader pulls it from a load: each chunk as one block, then ``[]``."""
    pieces = iter(chunks)
    return lambda: [piece] if (piece := next(pieces, b"")) else []


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A new folder on another filesystem than ``tmp_path``: the tmpfs at ``/dev/shm``, where a
    rename from ``tmp_path`` fails with EXDEV."""
    base = Path("/dev/shm")
    if not base.is_dir() or not os.access(base, os.W_OK) or base.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm writable and on another filesystem than the test's temporary folder")
    folder = Path(tempfile.mkdtemp(prefix="checkpointio-test-", dir=base))
    try:
        yield folder
    finally:
        remove_tree(folder)
