"""A botocore session that starts quicker: S3's models parsed in a worker thread, not on the loop."""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from aiobotocore.session import AioSession
from botocore.exceptions import DataNotFoundError
from botocore.loaders import JSONFileLoader, Loader

logger = logging.getLogger(__name__)


class _Services(Sequence[str]):
    """The services a loader knows, as botocore asks for them: mostly ``"s3" in services``.

    botocore answers that by listing ~400 service folders, twice (~15 ms of a cold start); here
    ``in`` looks in the one folder asked about, and the whole list is made only if iterated.
    """

    def __init__(self, loader: Loader, type_name: str) -> None:
        self._loader = loader
        self._type_name = type_name
        self._all: list[str] | None = None

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            return False
        try:
            return bool(self._loader.list_api_versions(name, self._type_name))
        except DataNotFoundError:
            return False

    def _everything(self) -> list[str]:
        if self._all is None:
            self._all = Loader.list_available_services(self._loader, self._type_name)
        return self._all

    def __getitem__(self, index: Any) -> Any:
        return self._everything()[index]

    def __len__(self) -> int:
        return len(self._everything())


class _PlainJSONFileLoader(JSONFileLoader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's model files parsed into plain dicts (ordered, as every dict) instead of
    ``OrderedDict``: 2-3x faster to parse (S3's model and the endpoint data: ~13 ms less)."""

    def load_file(self, file_path: str) -> Any:
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            full_path = file_path + extension
            if os.path.isfile(full_path):
                with opener(full_path, "rb") as file:
                    return json.loads(file.read().decode("utf-8"))
        return super().load_file(file_path)  # a format this botocore added since


class _DataLoader(Loader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's data loader, quicker to start: see :class:`_Services` and :class:`_PlainJSONFileLoader`."""

    def list_available_services(self, type_name: str) -> Any:
        return _Services(self, type_name)


def _data_loader(session: AioSession) -> Loader:
    """What botocore's ``create_loader`` builds, with the faster parts (``AWS_DATA_PATH`` honoured)."""
    data_path = session.get_config_variable("data_path")
    paths = None
    if data_path:
        paths = [os.path.expanduser(os.path.expandvars(path)) for path in data_path.split(os.pathsep)]
    return _DataLoader(extra_search_paths=paths, file_loader=_PlainJSONFileLoader())


def _prepared_session(profile: str | None) -> AioSession:
    """A session with S3's service model and endpoint rules already parsed.

    Creating a client parses ~60 ms of botocore JSON; done here, in a worker thread, the client
    itself is then created on the event loop in a few milliseconds instead of stalling it.
    """
    session = AioSession(profile=profile)
    try:
        session.register_component("data_loader", _data_loader(session))
        loader = session.get_component("data_loader")
        loader.load_service_model("s3", "service-2")
        loader.load_service_model("s3", "endpoint-rule-set-1")
        loader.load_data("partitions")
        loader.load_data("sdk-default-configuration")
        session._get_internal_component("endpoint_resolver")
    except Exception as error:  # pragma: no cover - botocore internals moved: merely slower
        logger.debug("could not preload botocore data: %s", error)
    return session
