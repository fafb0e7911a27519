"""botocore's start-up, moved off the event loop and made quicker: the one place where checkpointio
relies on how botocore works inside (its figures: ``benchmarks/README.md``, *Client start-up*).

Creating an S3 client parses botocore's JSON models on the calling thread, which for us is the
event loop. :func:`prepared_session` does that work in a worker thread first, with a quicker loader:

- :func:`preload` parses what creating a client reads (S3's model and endpoint rules, partitions,
  endpoints, retry and default settings). It relies on botocore's ``Loader`` keeping what it
  parsed for the session's life (``instance_cache``); through public calls only.
- :class:`_DataLoader` answers ``"s3" in list_available_services(...)``, the question botocore
  asks, by looking in S3's folder instead of listing ~400 service folders; the full list is made
  only if iterated. It relies on botocore asking that question by ``in``.
- :class:`_PlainJSONFileLoader` parses into plain dicts instead of ``OrderedDict``.
- The loader, with what it parsed, is shared by every session of the process (per data path): a
  client made later (another event loop's, a receiving thread's) parses nothing again. botocore
  itself shares one loader among the clients of a session, and what it changes in the parsed
  models holds for every client (S3's request URIs lose their ``/{Bucket}`` once, idempotently).

``tests/test_s3.py::test_botocore_start_up_work_is_all_done_before_the_client_is_created`` fails
when botocore changes so that either stops holding (creating a client parses a file again, or the
service folders are listed); at run time a failure here only costs the time it would have saved.
"""

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

from ..._concurrency import ForkSafeLock

logger = logging.getLogger(__name__)


def prepared_session(profile: str | None) -> AioSession:
    """Worker thread: a session with the quicker loader and everything a client reads already parsed."""
    session = AioSession(profile=profile)
    try:
        session.register_component("data_loader", _data_loader(session))
        with _preloading:  # sessions made at once (the receivers') parse once: the others wait for it
            preload(session)
    except Exception as error:  # botocore changed: merely slower here; the test named above fails
        logger.debug("could not preload botocore data: %s", error)
    return session


def preload(session: AioSession) -> None:
    """Parse, into the session's loader, the files creating an S3 client reads."""
    loader = session.get_component("data_loader")
    loader.load_service_model("s3", "service-2")
    loader.load_service_model("s3", "endpoint-rule-set-1")
    for name in ("partitions", "sdk-default-configuration", "_retry"):
        loader.load_data(name)
    session.get_available_partitions()  # builds the endpoint resolver: parses "endpoints"


#: The loader of each data path (``AWS_DATA_PATH``), shared by the sessions of the process.
_loaders: dict[str | None, Loader] = {}
_loaders_lock = ForkSafeLock()  # a forked child finds these released
_preloading = ForkSafeLock()


def _data_loader(session: AioSession) -> Loader:
    """What botocore's ``create_loader`` builds, with the quicker parts (``AWS_DATA_PATH`` honoured),
    made once per data path."""
    data_path = session.get_config_variable("data_path")
    with _loaders_lock:
        loader = _loaders.get(data_path)
        if loader is None:
            paths = None
            if data_path:
                paths = [os.path.expanduser(os.path.expandvars(path)) for path in data_path.split(os.pathsep)]
            loader = _loaders[data_path] = _DataLoader(extra_search_paths=paths, file_loader=_PlainJSONFileLoader())
        return loader


class _DataLoader(Loader):  # type: ignore[misc]  # botocore has no type hints
    """botocore's data loader, quicker to start: see :class:`_Services` and :class:`_PlainJSONFileLoader`."""

    def list_available_services(self, type_name: str) -> Any:
        return _Services(self, type_name)


class _Services(Sequence[str]):
    """The services a loader knows, as botocore asks for them: ``"s3" in services``.

    ``in`` looks in the one folder asked about; the whole list (every service folder, listed
    twice) is made only if iterated.
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
    ``OrderedDict``: quicker to parse."""

    def load_file(self, file_path: str) -> Any:
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            full_path = file_path + extension
            if os.path.isfile(full_path):
                with opener(full_path, "rb") as file:
                    return json.loads(file.read().decode("utf-8"))
        return super().load_file(file_path)  # a format this botocore added since
