"""The API's shape: typed transfer options, awaitables that cannot be truth-tested, one naming rule."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import re
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from checkpointio import Checkpoint, MiB, TaskEnvironment, TransferConfig, TransferOptions
from checkpointio._config import field_help
from checkpointio._pending import Pending

from .conftest import StoreCase


def test_each_transfer_setting_is_documented_next_to_its_field() -> None:
    doc = " ".join((TransferConfig.__doc__ or "").split())
    for setting in dataclasses.fields(TransferConfig):
        text, unset = field_help(setting.name)
        assert text.endswith(".") and len(text.split()) > 1, setting.name  # a sentence, not a stub
        # a field whose default is None says what None means; one with a value does not need to
        assert (unset is not None) == (setting.default is None), setting.name
        assert f"{setting.name}: {text}" in doc, setting.name  # help(TransferConfig) lists it
    assert doc.index("Attributes:") < doc.index("Raises:")  # Google style order, whatever Python's version
    with pytest.raises(KeyError):
        field_help("part_sise")


def test_the_configuration_page_lists_every_transfer_setting_and_no_other() -> None:
    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = page.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    listed = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert listed == {setting.name for setting in dataclasses.fields(TransferConfig)}


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
        TransferConfig(**{field: object()})  # type: ignore[arg-type]  # the wrong type on purpose


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


def test_truth_testing_an_async_method_s_result_is_an_error_naming_the_sync_twin(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "b", src=tmp_path / "a")
    calls: dict[str, Callable[[], object]] = {
        "prev_exists": cp.prev_exists,
        "load": cp.load,
        "load_bytes": cp.load_bytes,
        "save": lambda: cp.save(b"state"),
        "wait": cp.wait,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, call in calls.items():
            with pytest.raises(TypeError) as error:
                if call():  # the flyte idiom ported to async methods: always true without the error
                    pytest.fail("unreachable")
            assert str(error.value) == (
                f"cp.{name}() returns an awaitable, which is always true: write `await cp.{name}()` in async "
                f"code, or call cp.{name}_sync() in sync code"
            )
        gc.collect()
    assert [str(w.message) for w in caught] == []  # closed: no "coroutine was never awaited" on top
    assert not (tmp_path / "b").exists()  # the save was never started
    assert cp.prev_exists_sync() is False and cp.load_sync() is None


def test_the_awaitables_still_work_wherever_a_coroutine_does(store: StoreCase) -> None:
    cp = Checkpoint(store.uri("b"), src=store.uri("b"))
    assert asyncio.run(cp.prev_exists()) is False

    async def main() -> tuple[bool, bytearray | None, bytearray | None]:
        handle = await asyncio.create_task(cp.save(b"first"))
        assert handle.done()
        exists, first = await asyncio.gather(cp.prev_exists(), cp.load_bytes())
        async with anyio.create_task_group() as group:
            group.start_soon(cp.save, b"second")
        return exists, first, await cp.load_bytes()

    assert asyncio.run(main()) == (True, bytearray(b"first"), bytearray(b"second"))
    assert anyio.run(cp.prev_exists) is True
    cp.close()


def test_only_the_porting_trap_raises_not_the_event_loop_s_own_truth_tests(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "b", src=tmp_path / "a")
    pending = cp.prev_exists()
    # asyncio's task repr tests `if task._coro:` (3.12+): the libraries' generic code sees a true object.
    assert eval("bool(pending)", {"__name__": "asyncio.base_tasks", "pending": pending}) is True
    with pytest.raises(TypeError, match="returns an awaitable"):
        eval("bool(pending)", {"__name__": "user_script", "pending": pending})

    async def main() -> tuple[str, str, bool]:
        task = asyncio.create_task(cp.prev_exists())
        before = repr(task)  # not started yet
        exists = await task
        return before, repr(task), exists

    before, after, exists = asyncio.run(main())
    assert "cp.prev_exists" in before and "pending" in before and "finished" in after and exists is False

    async def step() -> None:
        await asyncio.sleep(0)

    started = Pending(step(), "cp.wait", "cp.wait_sync")
    started.send(None)  # a coroutine already running is no porting trap
    assert bool(started) is True
    started.close()


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("checkpointio.torch", ["torch"], "torch"),
        ("checkpointio.dcp", ["torch"], "torch"),
        ("checkpointio.lightning", ["lightning", "pytorch_lightning"], "lightning"),
        ("checkpointio.hf", ["transformers"], "hf"),
    ],
)
def test_an_integration_without_its_extra_says_which_extra_to_install(
    module: str, missing: list[str], extra: str, tmp_path: Path
) -> None:
    """Run where the extra's packages cannot be imported, as where they are not installed."""
    from .scripts import run_script

    result = run_script(
        f"""
        import importlib, importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.partition(".")[0] in {missing!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, NotInstalled())
        try:
            importlib.import_module({module!r})
            if {module!r} == "checkpointio.torch":  # imports torch at its first use
                from checkpointio import Checkpoint
                from checkpointio.torch import save_state_sync

                save_state_sync(Checkpoint("memory://extra/a"), step=1)
        except ImportError as error:
            print(type(error).__name__, error)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install 'checkpointio[{extra}]'" in result.stdout, result.stdout
    assert result.stdout.startswith(("ImportError checkpointio.", "ModuleNotFoundError checkpointio.")), result.stdout
