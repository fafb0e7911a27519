"""Pure parts, tested without an event loop: URIs, settings, part planning, latest_checkpoint."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpointio import Checkpoint, MiB, ObjectTooLargeError, TaskEnvironment, TransferConfig, latest_checkpoint
from checkpointio._config import is_endpoint
from checkpointio._location import checkpoint_location, parse_location, parse_prefix
from checkpointio._planning import (
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    check_object_size,
    part_size_for_known_size,
    part_size_for_stream,
    ranges,
)

from .scripts import run_script


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "key"),
    [
        ("s3://bucket/run/attempt-0", "s3", "bucket", "run/attempt-0"),
        ("memory://tests/a", "memory", "", "tests/a"),
        ("file:///tmp/ckpt", "file", "", "/tmp/ckpt"),
        ("/tmp/ckpt", "file", "", "/tmp/ckpt"),
        # keys and names are taken literally, not cut at URL delimiters (two keys became one)
        ("s3://bucket/exp#1/ckpt", "s3", "bucket", "exp#1/ckpt"),
        ("s3://bucket/step?x=1", "s3", "bucket", "step?x=1"),
        ("s3://bucket/a%20b\tc", "s3", "bucket", "a%20b\tc"),
        ("S3://bucket//k", "s3", "bucket", "k"),
        ("memory://run#2", "memory", "", "run#2"),
        ("file:///tmp/a%20b#c?d", "file", "", "/tmp/a b#c?d"),  # file URIs are percent-decoded
        ("file://localhost/tmp/x", "file", "", "/tmp/x"),
        ("file:/tmp/a%20b", "file", "", "/tmp/a b"),  # RFC 8089's one-slash form
        ("FILE:/tmp/x", "file", "", "/tmp/x"),
        ("/tmp/run:7", "file", "", "/tmp/run:7"),  # a colon further on is part of a name
        ("/tmp/s3:/x", "file", "", "/tmp/s3:/x"),
        ("s3://my_old.Bucket-1/k", "s3", "my_old.Bucket-1", "k"),
        # a trailing "/" (a folder) is kept by S3 and memory alike; a path's names the same folder
        ("s3://bucket/runs/7/", "s3", "bucket", "runs/7/"),
        ("memory://runs/7/", "memory", "", "runs/7/"),
        ("memory:///runs/7", "memory", "", "runs/7"),
        ("/tmp/runs/7/", "file", "", "/tmp/runs/7"),
    ],
)
def test_uris_parse_into_locations(uri: str, scheme: str, bucket: str, key: str) -> None:
    location = parse_location(uri)
    assert (location.scheme, location.bucket, location.key) == (scheme, bucket, key)
    if scheme != "file":
        assert parse_location(location.uri) == location


def test_relative_paths_become_absolute() -> None:
    assert parse_location("ckpt").key == os.path.join(os.getcwd(), "ckpt")


@pytest.mark.parametrize("uri", ["", "s3://bucket", "s3:///key", "gs://bucket/key", "memory://", "memory:///"])
def test_bad_uris_are_refused_with_a_message(uri: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_location(uri)


def wrong(value: object) -> Any:
    """``value`` typed as anything: a value of the wrong type, passed on purpose."""
    return value


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"wait": "no"}, "wait must be True or False, got str 'no'"),
        ({"supersede": 1}, "supersede must be True or False, got int 1"),
    ],
)
def test_save_flags_that_are_not_bools_are_refused_and_nothing_is_saved(flags: dict[str, Any], message: str) -> None:
    cp = Checkpoint(f"memory://flags-{sorted(flags)[0]}/ckpt")
    with pytest.raises(TypeError, match=re.escape(message)):
        cp.save_sync(b"data", **flags)
    assert not cp.prev_exists_sync() and cp.pending is None
    assert Checkpoint("memory://unused", src=f"memory://flags-{sorted(flags)[0]}/ckpt").load_bytes_sync() is None


@pytest.mark.parametrize(
    ("make", "shown"),
    [
        (lambda: parse_location(wrong(123)), "int 123"),
        (lambda: parse_prefix(wrong(None)), "NoneType None"),
        (lambda: Checkpoint(wrong(123)), "int 123"),
        (lambda: Checkpoint(wrong(b"memory://a/b")), "bytes b'memory://a/b'"),
        (lambda: Checkpoint("memory://a/b", src=wrong(5)), "int 5"),
        (lambda: Checkpoint("memory://a/b", src=wrong(b"memory://a/a")), "bytes b'memory://a/a'"),
        (lambda: Checkpoint("memory://a/b", src=wrong(["memory://a/a", 7])), "int 7"),
        (lambda: TaskEnvironment("train", storage=wrong(5)), "int 5"),
    ],
)
def test_a_uri_of_the_wrong_type_is_a_type_error_saying_what_a_uri_is(make: Callable[[], object], shown: str) -> None:
    with pytest.raises(TypeError) as caught:
        make()
    assert str(caught.value) == f"a checkpoint URI must be a str or an os.PathLike (a pathlib.Path), got {shown}"


def test_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        TransferConfig(part_size=1 * MiB)
    with pytest.raises(ValueError, match="5 GiB"):
        TransferConfig(part_size=6 * 1024 * MiB)
    with pytest.raises(ValueError, match="largest single PUT"):
        TransferConfig(multipart_threshold=5 * 1024 * MiB + 1)
    with pytest.raises(ValueError, match="compression_level"):
        TransferConfig(compression_level=10)
    with pytest.raises(ValueError, match="receive_workers must be at least 1, got 0"):
        TransferConfig(receive_workers=0)
    with pytest.raises(TypeError, match="unknown checkpoint option"):
        TransferConfig().with_options(part_sise=8 * MiB)  # type: ignore[call-arg]  # a misspelt option on purpose
    assert TransferConfig().with_options(max_concurrency=3).max_concurrency == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpoint_url": "notaurl"}, "endpoint_url must be an http:// or https:// URL with a host"),
        ({"endpoint_url": "127.0.0.1:9000"}, "got '127.0.0.1:9000'"),
        ({"endpoint_url": "ftp://host"}, "endpoint_url must be an http:// or https:// URL"),
        ({"endpoint_url": "http://"}, "endpoint_url must be an http:// or https:// URL with a host"),
        ({"endpoint_url": "http://host:port"}, "endpoint_url must be an http:// or https:// URL"),
        ({"endpoint_url": "http://[::1"}, "endpoint_url must be an http:// or https:// URL"),
        ({"region_name": "us east 1"}, "region_name must be a region name such as us-east-1, got 'us east 1'"),
        ({"region_name": ""}, "region_name must be a region name"),
        ({"region_name": "123"}, "region_name must be a region name such as us-east-1, got '123'"),
        ({"connect_timeout": float("nan")}, "connect_timeout must be a positive number of seconds, got nan"),
        ({"read_timeout": 0}, "read_timeout must be a positive number of seconds, got 0"),
    ],
)
def test_a_setting_the_s3_client_could_not_use_is_a_value_error_naming_it(
    options: dict[str, Any], message: str
) -> None:
    """Refused where the settings are made, not as botocore's error (no URI, not a ValueError)
    at the first request."""
    with pytest.raises(ValueError, match=re.escape(message)):
        TransferConfig(**options)


def test_endpoints_and_regions_the_s3_client_takes_are_accepted() -> None:
    for endpoint in ("http://127.0.0.1:9000", "https://s3.example.com", "HTTP://[::1]:9000/", "https://host/path"):
        assert TransferConfig(endpoint_url=endpoint).endpoint_url == endpoint
    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    for url in (
        "http://localhost",
        "http://under_score:9000",
        "http://a..b",
        "http://-a",
        "http://[::1]:90",
        "http://x\t",
    ):
        botocore_takes = bool(is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))
        assert is_endpoint(url) == botocore_takes, url  # the same hosts as botocore's own check
    assert TransferConfig(region_name="eu-central-1", connect_timeout=0.5).region_name == "eu-central-1"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"server_side_encryption": "aes256"}, ValueError, "server_side_encryption must be one of AES256, aws:kms"),
        ({"sse_kms_key_id": "alias/ckpt"}, ValueError, "sse_kms_key_id needs server_side_encryption='aws:kms'"),
        ({"server_side_encryption": "AES256", "sse_kms_key_id": "k"}, ValueError, "needs server_side_encryption="),
        ({"server_side_encryption": "aws:kms", "sse_kms_key_id": ""}, ValueError, "sse_kms_key_id must be a key id"),
        ({"bucket_key_enabled": True}, ValueError, "bucket_key_enabled applies to server_side_encryption='aws:kms'"),
        ({"server_side_encryption": "aws:kms:dsse", "bucket_key_enabled": True}, ValueError, "bucket_key_enabled"),
        ({"server_side_encryption": "aws:kms", "bucket_key_enabled": "yes"}, TypeError, "'bucket_key_enabled' must"),
        ({"requester_pays": "requester"}, TypeError, "option 'requester_pays' must be bool, got str 'requester'"),
        ({"storage_class": "GLACIER"}, ValueError, "storage_class 'GLACIER' is refused: such objects cannot be"),
        ({"storage_class": "DEEP_ARCHIVE"}, ValueError, "until they are restored"),
        ({"storage_class": "standard_ia"}, ValueError, "storage_class must be one of STANDARD, REDUCED_REDUNDANCY"),
        ({"expected_bucket_owner": "my-account"}, ValueError, "expected_bucket_owner must be a 12-digit AWS account"),
        ({"expected_bucket_owner": 123456789012}, TypeError, "option 'expected_bucket_owner' must be str or None"),
        ({"tags": "team=ml"}, TypeError, "option 'tags' must be"),
        ({"tags": {str(n): "v" for n in range(11)}}, ValueError, "at most 10 per object, got 11"),
        ({"tags": {"step": 7}}, TypeError, "option 'tags': keys and values must be str, got 'step': 7"),
        ({"tags": {"": "v"}}, ValueError, "a key must be 1 to 128 characters"),
        ({"tags": {"k" * 129: "v"}}, ValueError, "a key must be 1 to 128 characters"),
        ({"tags": {"k": "v" * 257}}, ValueError, "a value at most 256"),
        ({"tags": {"aws:owner": "me"}}, ValueError, "keys starting with 'aws:' are reserved"),
    ],
)
def test_s3_request_options_refuse_what_s3_would(options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        TransferConfig(**options)


def test_s3_request_options_keep_their_values_and_the_settings_stay_hashable() -> None:
    tags = {"team": "ml"}
    config = TransferConfig(
        server_side_encryption="aws:kms",
        sse_kms_key_id="alias/ckpt",
        bucket_key_enabled=False,
        storage_class="INTELLIGENT_TIERING",
        tags=tags,
        expected_bucket_owner="123456789012",
        requester_pays=True,
    )
    tags["team"] = "changed later"
    assert config.tags == {"team": "ml"}  # a copy
    assert hash(config) == hash(config.with_options(tags={"other": "tags"}))
    assert config.with_options(max_concurrency=3).sse_kms_key_id == "alias/ckpt"


def test_part_size_grows_so_no_object_needs_more_than_10000_parts() -> None:
    assert part_size_for_known_size(100 * MiB, 16 * MiB) == 16 * MiB
    for size in (200 * 1024 * MiB, 1024 * 1024 * MiB, MAX_OBJECT_SIZE):
        part = part_size_for_known_size(size, 16 * MiB)
        assert -(-size // part) <= MAX_PARTS
        assert part % MiB == 0


@pytest.mark.parametrize("part_size", [5 * MiB, 6 * MiB, 8 * MiB, 16 * MiB, 100 * MiB, 5 * 1024 * MiB])
def test_stream_parts_reach_the_object_limit_within_10000_parts(part_size: int) -> None:
    sizes = [part_size_for_stream(i, part_size) for i in range(MAX_PARTS)]
    assert sum(sizes) >= MAX_OBJECT_SIZE
    assert sizes == sorted(sizes)
    assert sizes[0] == part_size and max(sizes) <= MAX_PART_SIZE


def test_stream_parts_keep_their_size_as_long_as_the_limit_allows() -> None:
    # memory in flight is part_size * (max_concurrency + 1) for as long as parts do not grow
    def kept(part_size: int) -> int:
        return sum(part_size for i in range(MAX_PARTS) if part_size_for_stream(i, part_size) == part_size)

    assert kept(16 * MiB) >= 110 * 1024 * MiB  # the default: 148 MiB in flight up to 110 GiB of archive
    assert kept(5 * MiB) >= 20 * 1024 * MiB
    assert part_size_for_stream(MAX_PARTS - 1, 5 * MiB) == MAX_PART_SIZE  # the smallest parts need it all


def test_objects_over_5_tib_are_refused_up_front() -> None:
    check_object_size(MAX_OBJECT_SIZE, "s3://b/k")
    with pytest.raises(ObjectTooLargeError, match="s3://b/k"):
        check_object_size(MAX_OBJECT_SIZE + 1, "s3://b/k")


def test_ranges_cover_the_object_in_order() -> None:
    assert ranges(10, 4) == [(0, 3), (4, 7), (8, 9)]
    assert ranges(0, 4) == []


def test_latest_checkpoint_prefers_newest_mtime(tmp_path: Path) -> None:
    for i, name in enumerate(["a/last.ckpt", "b/last.ckpt", "c/last.ckpt"]):
        path = tmp_path / name
        path.parent.mkdir()
        path.write_text(name)
        os.utime(
            path, (1000 + i * (1 if name != "b/last.ckpt" else 10), 1000 + i * (1 if name != "b/last.ckpt" else 10))
        )
    assert latest_checkpoint(tmp_path) == tmp_path / "b/last.ckpt"


def test_latest_checkpoint_breaks_mtime_ties_by_natural_name_order(tmp_path: Path) -> None:
    for name in ["epoch_9.pt", "epoch_10.pt", "epoch_2.pt"]:
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (1000, 1000))
    assert latest_checkpoint(tmp_path, "*.pt") == tmp_path / "epoch_10.pt"


def test_latest_checkpoint_handles_none_missing_and_custom_key(tmp_path: Path) -> None:
    assert latest_checkpoint(None) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path, "*.pt") is None
    (tmp_path / "a.pt").write_text("aaaa")
    (tmp_path / "b.pt").write_text("b")
    assert latest_checkpoint(tmp_path, "*.pt", key=lambda p: p.stat().st_size) == tmp_path / "a.pt"
    assert latest_checkpoint(tmp_path / "a.pt", "*.pt") == tmp_path / "a.pt"


@pytest.mark.parametrize("pattern", ["../*.pt", "sub/../../*.pt", "/etc/*", "", "**/.."])
def test_latest_checkpoint_refuses_a_pattern_reaching_outside_root_naming_it(tmp_path: Path, pattern: str) -> None:
    """The newest file *under root*: a pattern that climbs out of it (or is absolute, or empty)
    would return another folder's file, or fail with pathlib's error naming neither."""
    root = tmp_path / "run"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "step_1.pt").write_text("mine")
    (tmp_path / "other.pt").write_text("someone else's, newer")
    with pytest.raises(ValueError) as caught:
        latest_checkpoint(root, pattern)
    assert str(caught.value) == (
        f"latest_checkpoint: pattern {pattern!r} must be a relative glob of files under {root} "
        "(not empty, not absolute, no '..')"
    )
    with pytest.raises(TypeError, match=r"latest_checkpoint: pattern must be a str glob .*, got int"):
        latest_checkpoint(root, 5)  # type: ignore[arg-type]  # a wrong type on purpose
    assert latest_checkpoint(root, "sub/./*.pt") == root / "sub" / "step_1.pt"  # '.' parts are harmless
    assert latest_checkpoint(root / "sub" / "step_1.pt", "*.pt") == root / "sub" / "step_1.pt"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
@pytest.mark.parametrize(
    ("pattern", "folder", "mode"),
    [
        ("*.pt", "", 0o311),  # search permission only: not listable
        ("**/last.ckpt", "epoch_3", 0o311),
        ("run-*/*.pt", "run-2", 0o311),
        ("run-*/step-*/last.ckpt", "run-1/step-3", 0o000),  # not even searchable: last.ckpt unseen
        ("run-*/ckpt/*.pt", "run-2/ckpt", 0o311),
        ("run-*/**/*.pt", "run-2/a/b", 0o311),
    ],
)
def test_latest_checkpoint_in_a_folder_it_cannot_list_is_an_access_error_not_none(
    tmp_path: Path, pattern: str, folder: str, mode: int
) -> None:
    # An unreadable run folder (or a folder under it that the pattern looks into) may hold the
    # newest checkpoint: "none found" would start the task over.
    run = tmp_path / "run"
    hidden = run / folder
    hidden.mkdir(parents=True)
    (hidden / "last.ckpt").write_text("newest")
    (hidden / "step.pt").write_text("newest")
    (run / "run-0").mkdir()  # readable, matching nothing: the others must still be looked into
    hidden.chmod(mode)
    try:
        result = run_script(
            f"""
            from checkpointio import AccessDeniedError, latest_checkpoint
            try:
                print(latest_checkpoint({str(run)!r}, {pattern!r}))
            except AccessDeniedError as error:
                print(error)
            """,
            tmp_path,
            unprivileged=True,
        )
    finally:
        hidden.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hidden}: cannot list it to find the latest checkpoint: Permission denied\n"
    # Readable again, the pattern finds the file: the folder was one it had to look into.
    assert latest_checkpoint(run, pattern) in (hidden / "last.ckpt", hidden / "step.pt")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run without root's file access")
def test_latest_checkpoint_through_a_symlink_into_a_folder_it_may_not_search_is_an_access_error(
    tmp_path: Path,
) -> None:
    # A run folder that is a symlink into a folder that may not be searched: whether it is a folder,
    # and what it holds, is unknown; skipping it would make "none" out of "cannot look".
    secret = tmp_path / "secret"
    (secret / "run-2").mkdir(parents=True)
    (secret / "run-2" / "step.pt").write_text("newest")
    run = tmp_path / "run"
    (run / "run-0").mkdir(parents=True)
    (run / "run-2").symlink_to(secret / "run-2")
    (run / "run-3").symlink_to("run-3")  # a loop holds no checkpoint: skipped, as Path.glob does
    secret.chmod(0o000)
    try:
        result = run_script(
            f"""
            from checkpointio import AccessDeniedError, latest_checkpoint
            try:
                print(latest_checkpoint({str(run)!r}, "run-*/*.pt"))
            except AccessDeniedError as error:
                print(error.uri, "|", error)
            """,
            tmp_path,
            unprivileged=True,
        )
    finally:
        secret.chmod(0o755)
    assert result.returncode == 0, result.stderr
    shown = run / "run-2"
    assert result.stdout == f"{shown} | {shown}: cannot list it to find the latest checkpoint: Permission denied\n"
    assert latest_checkpoint(run, "run-*/*.pt") == run / "run-2" / "step.pt"
    (run / "run-2").unlink()
    assert latest_checkpoint(run, "run-*/*.pt") is None
    assert latest_checkpoint(run, "run-3/*.pt") is None  # the loop named, not matched


@pytest.mark.parametrize("pathlib", ["", "import tests.pathlib314"], ids=["pathlib", "pathlib-3.14"])
def test_latest_checkpoint_behind_a_folder_it_may_not_search_is_an_access_error_not_a_raw_oserror(
    tmp_path: Path,
    pathlib: str,
) -> None:
    # The root itself cannot be looked at (its parent is not searchable): whether it is a file, a
    # folder or nothing is unknown, which is no "none" either.
    behind = tmp_path / "behind"
    (behind / "run").mkdir(parents=True)
    (behind / "run" / "last.ckpt").write_text("newest")
    behind.chmod(0o000)
    try:
        result = run_script(
            f"""
            {pathlib}
            from checkpointio import AccessDeniedError, latest_checkpoint
            for root in ({str(behind / "run")!r}, {str(behind / "run" / "last.ckpt")!r}):
                try:
                    print(latest_checkpoint(root))
                except AccessDeniedError as error:
                    print(error.uri, "|", error)
            """,
            tmp_path,
            unprivileged=True,
        )
    finally:
        behind.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{behind / name} | {behind / name}: cannot list it to find the latest checkpoint: Permission denied"
        for name in ("run", "run/last.ckpt")
    ]
    assert latest_checkpoint(behind / "run") == behind / "run" / "last.ckpt"


def test_names_with_a_colon_that_do_not_look_like_a_scheme_are_local_paths() -> None:
    assert parse_location("run:7").key == os.path.join(os.getcwd(), "run:7")
    assert parse_location("./s3:/bucket/x").key == os.path.join(os.getcwd(), "s3:/bucket/x")  # said explicitly


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("s3:/bucket/x", "did you mean s3://bucket/x?"),
        ("S3:/bucket/x", "did you mean s3://bucket/x?"),
        ("s3:bucket/x", "did you mean s3://bucket/x?"),
        ("s3//bucket/x", "did you mean s3://bucket/x?"),
        ("s3:", "did you mean s3://?"),
        ("memory:/run", "did you mean memory://run?"),
        ("file:tmp/x", "did you mean file:///tmp/x?"),
        ("gs:/bucket/x", "no store handles 'gs'"),
        ("https:/host/x", "no store handles 'https'"),
    ],
)
def test_a_mistyped_scheme_is_refused_not_saved_to_a_local_folder(uri: str, hint: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mistyped scheme") as caught:
        parse_location(uri)
    assert hint in str(caught.value) and repr(uri) in str(caught.value)
    with pytest.raises(ValueError, match="mistyped scheme"):
        Checkpoint(uri)  # the library refuses what the command line refuses
    with pytest.raises(ValueError, match="mistyped scheme"):
        parse_prefix(uri)


@pytest.mark.parametrize("uri", ["s3://bücket/x", "s3://my bucket/x", "s3://bucket:1/x"])
def test_a_bucket_name_botocore_would_refuse_is_refused_up_front(uri: str) -> None:
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        parse_location(uri)
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        parse_prefix(uri.rsplit("/", 1)[0])


@pytest.mark.parametrize("uri", ["newdir/", "/tmp/runs/7/", "./", "file:///tmp/runs/7/"])
def test_a_local_checkpoint_path_ending_in_a_slash_is_refused_as_a_folder(uri: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ends with '/', a folder: a checkpoint URI names one file, e\.g\. .*/NAME"):
        checkpoint_location(uri)
    with pytest.raises(ValueError, match="ends with '/', a folder"):
        Checkpoint(uri)
    with pytest.raises(ValueError, match="ends with '/', a folder"):
        Checkpoint(tmp_path / "next", src=uri)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_uri_ending_in_a_slash_is_refused_but_a_prefix_may() -> None:
    with pytest.raises(ValueError, match=r"ends with '/'.*s3://bucket/runs/7/NAME"):
        checkpoint_location("s3://bucket/runs/7/")
    with pytest.raises(ValueError, match="ends with '/'"):
        Checkpoint("s3://bucket/runs/7/")
    assert parse_prefix("s3://bucket/runs/7/") == parse_location("s3://bucket/runs/7/")
    with pytest.raises(ValueError, match=r"ends with '/'.*memory://runs/7/NAME"):
        checkpoint_location("memory://runs/7/")
    assert parse_prefix("memory://runs/7/").key == "runs/7/"
    assert parse_prefix("/tmp/runs/7/").key == "/tmp/runs/7/"  # the folder only, as on S3
    assert parse_prefix("/tmp/runs/7").key == checkpoint_location("/tmp/runs/7").key == "/tmp/runs/7"
    assert parse_prefix("s3://bucket/").key == ""
