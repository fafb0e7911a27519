"""The API's shape: typed transfer options, awaitables that cannot be truth-tested, one naming rule."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpointio import Checkpoint, MiB, TaskEnvironment, TransferConfig, TransferOptions

from .conftest import StoreCase


def test_the_typed_options_are_exactly_transfer_configs_fields_with_their_types() -> None:
    # A field added to TransferConfig must be added to TransferOptions too (and the other way round).
    assert typing.get_type_hints(TransferOptions) == typing.get_type_hints(TransferConfig)
    assert list(typing.get_type_hints(TransferOptions)) == [field.name for field in dataclasses.fields(TransferConfig)]
    assert TransferOptions.__required_keys__ == frozenset()  # every option may be left out


WRONG_TYPES = [
    ("part_size", "16MiB", "option 'part_size' must be int, got str '16MiB' (a number of bytes, e.g. 16 * MiB)"),
    ("max_concurrency", 2.5, "option 'max_concurrency' must be int, got float 2.5"),
    ("compression_level", True, "option 'compression_level' must be int, got bool True"),
    ("connect_timeout", "10", "option 'connect_timeout' must be float, got str '10'"),
    ("endpoint_url", 9000, "option 'endpoint_url' must be str or None, got int 9000"),
    ("flexible_checksums", "no", "option 'flexible_checksums' must be bool, got str 'no'"),
]


def _entry_points(tmp_path: Path) -> dict[str, Callable[..., object]]:
    """Every way of passing transfer options, each called with one option."""
    cp = Checkpoint(tmp_path / "ckpt")
    return {
        "TransferConfig": lambda **option: TransferConfig(**option),
        "with_options": lambda **option: TransferConfig().with_options(**option),
        "Checkpoint": lambda **option: Checkpoint(tmp_path / "other", **option),
        "save_sync": lambda **option: cp.save_sync(b"state", **option),
        "TaskEnvironment": lambda **option: TaskEnvironment("e", storage=tmp_path, **option),
    }


@pytest.mark.parametrize(("name", "value", "message"), WRONG_TYPES)
def test_an_option_of_the_wrong_type_is_a_type_error_naming_it_wherever_it_is_given(
    tmp_path: Path, name: str, value: object, message: str
) -> None:
    for entry, call in _entry_points(tmp_path).items():
        with pytest.raises(TypeError) as caught:
            call(**{name: value})
        assert str(caught.value) == message, entry
    assert not (tmp_path / "ckpt").exists()  # the save with a bad option stored nothing


@pytest.mark.parametrize("field", [field.name for field in dataclasses.fields(TransferConfig)])
def test_every_option_checks_its_type(field: str) -> None:
    with pytest.raises(TypeError, match=rf"^option '{field}' must be .*, got object <object"):
        TransferConfig(**{field: object()})


def test_values_of_the_declared_types_are_accepted(store: StoreCase) -> None:
    config = TransferConfig(part_size=8 * MiB, connect_timeout=5, read_timeout=2.5, region_name=None)
    assert config.connect_timeout == 5 and config.part_size == 8 * MiB
    with Checkpoint(store.uri("ckpt"), max_concurrency=2, flexible_checksums=False) as cp:
        cp.save_sync(b"state", compression_level=0, connect_timeout=30)
    with Checkpoint(store.uri("reader"), src=store.uri("ckpt")) as cp:
        assert cp.load_bytes_sync() == b"state"


def test_an_unknown_option_is_a_type_error_listing_the_valid_ones(tmp_path: Path) -> None:
    options: dict[str, Any] = {"part_sise": MiB}
    with pytest.raises(TypeError, match=r"unknown checkpoint option\(s\) \['part_sise'\]; valid: \[.*'part_size'"):
        Checkpoint(tmp_path / "ckpt", **options)
