"""Our tar reader (``checkpointio._tar``) against the standard library's ``tarfile`` (PEP 706 ``data``
filter): the same archive gives the same tree, or both refuse it.

Where the two disagree by design, our reader is the stricter one, and each such case is listed in
:data:`CRAFTED` with the reason. The rule the generated cases check: what ``tarfile`` refuses, we
refuse; what we restore, ``tarfile`` restores identically; we refuse only with our own errors.

Tree equality covers each entry's kind, file bytes, file mode and mtime, symlink targets and which
files are hard links of one another. Not compared: folders' modes (the ``data`` filter ignores
them; we keep the owner's bits) and the mode and mtime of hard-linked files (``tarfile`` applies a
link entry's own to the shared file; we, like GNU tar, leave the file's).

Not generated, because there ``tarfile`` and GNU tar disagree and we follow GNU tar: garbage in
header fields a restore never reads (owners, device numbers, the mode and mtime of pax and long-name
headers: ``tarfile`` refuses them), and two long-name or pax headers of one kind in a row
(``tarfile`` keeps the first, GNU tar and we the last). ``tarfile`` also ends an archive silently
at a bad header after the first one; that is counted as a refusal here.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from checkpointio import CorruptCheckpointError, UnsafeArchiveError, _tar

pytestmark = pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="tarfile without PEP 706 filters")

Tree = tuple[dict[str, tuple[object, ...]], list[list[str]]]
#: What a reader made of an archive: ``("ok", tree)`` or ``("refused", why)``.
Outcome = tuple[str, object]

MTIME = 1_600_000_000


def tree_of(root: Path) -> Tree:
    """Every entry below ``root``: kind and content; and the groups of hard-linked files."""
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                entries[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                entries[rel] = ("folder",)
            else:
                entries[rel] = ("file", Path(path).read_bytes(), st_.st_mode & 0o7777, int(st_.st_mtime))
                inodes.setdefault(st_.st_ino, []).append(rel)
    groups = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    for group in groups:  # see the module docstring: the metadata of hard-linked files is not compared
        for rel in group:
            entries[rel] = entries[rel][:2]
    return entries, groups


def ours(data: bytes, dest: Path) -> Outcome:
    dest.mkdir()
    try:
        _tar.extract(io.BytesIO(data).read, str(dest))
    except (CorruptCheckpointError, UnsafeArchiveError) as error:
        return "refused", error
    return "ok", tree_of(dest)


def theirs(data: bytes, dest: Path) -> Outcome:
    dest.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            tar.extractall(dest, filter="data")
            if data[tar.offset : tar.offset + _tar.BLOCK] != bytes(_tar.BLOCK):
                return "refused", f"tarfile stopped at a bad header at {tar.offset}"
    except Exception as error:  # tarfile's refusals are of many types (and RecursionError on link loops)
        return "refused", error
    return "ok", tree_of(dest)


def both(data: bytes, tmp: Path) -> tuple[Outcome, Outcome]:
    tmp.mkdir(parents=True, exist_ok=True)
    count = len(os.listdir(tmp))
    return ours(data, tmp / f"ours-{count}"), theirs(data, tmp / f"theirs-{count}")


def agree(data: bytes, tmp: Path) -> None:
    """The rule of the generated cases (module docstring)."""
    mine, reference = both(data, tmp)
    if reference[0] == "refused":
        assert mine[0] == "refused", f"tarfile refuses ({reference[1]}), we restore {mine[1]}"
    if mine[0] == "ok":
        assert reference == mine


# -- archives written by tarfile ----------------------------------------------------------------------

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: bytes
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    mtime: int = MTIME


def write(entries: list[Entry], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8") as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.mtime, info.linkname = entry.kind, entry.mode, entry.mtime, entry.link
            info.size = len(entry.data) if entry.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == tarfile.REGTYPE else None)
    return out.getvalue()


PARTS = st.sampled_from(["a", "b", "ü", "n" * 60, "m" * 101])


@st.composite
def archives(draw: st.DrawFn) -> tuple[str, list[Entry]]:
    """A well-formed archive of folders, files, symlinks that stay inside and hard links, in one of
    tarfile's formats: long and non-ASCII names, modes, times from before 1970 to past 2038."""
    paths = draw(st.lists(st.lists(PARTS, min_size=1, max_size=3).map("/".join), min_size=1, max_size=8, unique=True))
    folders = {posixpath.dirname(path) for path in paths} - {""}
    folders |= {posixpath.dirname(folder) for folder in folders} - {""}
    leaves = [path for path in paths if path not in folders]
    entries = [Entry(folder, tarfile.DIRTYPE, mode=0o755) for folder in sorted(folders) if draw(st.booleans())]
    files: list[Entry] = []
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    times = st.integers(0, 8**11 - 1) if fmt == "ustar" else st.integers(-(2**40), 2**40)
    for leaf in leaves:
        kind = draw(st.sampled_from(["file", "folder", "symlink", "hard link"] if files else ["file", "folder"]))
        if kind == "file":
            mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o4755, 0o777, 0o000, 0o511]))
            entry = Entry(leaf, tarfile.REGTYPE, draw(st.binary(max_size=1200)), mode=mode, mtime=draw(times))
            files.append(entry)
        elif kind == "folder":
            entry = Entry(leaf, tarfile.DIRTYPE, mode=0o700)
        elif kind == "symlink":  # to any path of the archive or a missing one, from the link's folder
            target = draw(st.sampled_from([*paths, "missing"]))
            entry = Entry(leaf, tarfile.SYMTYPE, link=posixpath.relpath(target, posixpath.dirname(leaf) or "."))
        else:
            source = draw(st.sampled_from(files))
            entry = Entry(leaf, tarfile.LNKTYPE, link=source.name, mode=source.mode, mtime=source.mtime)
        entries.append(entry)
    return fmt, entries


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(archive=archives())
def test_a_well_formed_archive_restores_as_tarfile_restores_it(
    archive: tuple[str, list[Entry]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    fmt, entries = archive
    try:
        data = write(entries, FORMATS[fmt])
    except ValueError:  # a name or time the format cannot hold
        assume(False)
    mine, reference = both(data, tmp_path_factory.mktemp("restore"))
    assert mine[0] == "ok", mine[1]
    assert mine == reference


# -- the same archives damaged ------------------------------------------------------------------------

SAMPLE = [
    Entry("d", tarfile.DIRTYPE, mode=0o755),
    Entry("d/" + "p" * 60, tarfile.DIRTYPE, mode=0o700),
    Entry("d/f", tarfile.REGTYPE, b"hello" * 150, mode=0o755),
    Entry("d/" + "p" * 60 + "/" + "n" * 80, tarfile.REGTYPE, b"long", mode=0o600),
    Entry("d/s", tarfile.SYMTYPE, link="f"),
    Entry("h", tarfile.LNKTYPE, link="d/f", mode=0o755),
    Entry("é", tarfile.REGTYPE, b"x"),
]
#: Header fields a restore reads: (offset, width).
FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "type": (156, 1),
          "link": (157, 100), "prefix": (345, 155)}  # fmt: skip
#: Bytes that make fields interesting: digits, signs, spaces, NULs, slashes, dots, high bytes, types.
TEXT = st.binary(max_size=12) | st.lists(st.sampled_from(list(b"01234567 \0-+_89/.a\x80\xff")), max_size=40).map(bytes)
VALUES = TEXT | st.sampled_from(
    [b"-1", b"+1", b" 1", b"1 ", b"0x1", b"\x80" + bytes(10) + b"\1", b"\xff" * 12, b"../x", b"/abs", b"d/s/x",
     b"..", b".", b"d/f/x", b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"\0", b"S", b"V", b"M", b"D"]
)  # fmt: skip
META = (b"x", b"g", b"L", b"K")


def _headers(data: bytes) -> list[int]:
    return [offset for offset in range(0, len(data), _tar.BLOCK) if _tar.is_header(data[offset : offset + _tar.BLOCK])]


def _with_checksum(block: bytes) -> bytes:
    block = block[:148] + b" " * 8 + block[156:]
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.data())
def test_a_damaged_header_is_refused_or_restored_as_tarfile_restores_it(
    fmt: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    archive = bytearray(write(SAMPLE, FORMATS[fmt]))
    offset = data.draw(st.sampled_from(_headers(bytes(archive))))
    field = data.draw(st.sampled_from(sorted(FIELDS)))
    meta = archive[offset + 156 : offset + 157] in META
    assume(not (meta and field in ("mode", "mtime")))  # see the module docstring
    start, width = FIELDS[field]
    value = data.draw(VALUES)[:width]
    assume(not (field == "type" and value in META))
    at = offset + start + data.draw(st.integers(0, width - len(value)))
    archive[at : at + len(value)] = value
    archive[offset : offset + _tar.BLOCK] = _with_checksum(bytes(archive[offset : offset + _tar.BLOCK]))
    agree(bytes(archive), tmp_path_factory.mktemp("damaged"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.data())
def test_a_truncated_or_flipped_archive_is_refused(
    fmt: str, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    archive = write(SAMPLE, FORMATS[fmt])
    end = archive.index(bytes(2 * _tar.BLOCK), _headers(archive)[-1])  # the end-of-archive marker
    if data.draw(st.booleans()):
        damaged = archive[: data.draw(st.integers(0, end))]
    else:  # a header byte changed, its checksum not: the header is corrupt
        at = data.draw(st.sampled_from(_headers(archive))) + data.draw(st.integers(0, _tar.BLOCK - 1))
        flip = data.draw(st.integers(1, 255))
        damaged = archive[:at] + bytes([archive[at] ^ flip]) + archive[at + 1 :]
        assume(not _tar.is_header(damaged[at - at % _tar.BLOCK :]))
    tmp = tmp_path_factory.mktemp("truncated")
    mine, _ = both(damaged, tmp)
    assert mine[0] == "refused"
    assert isinstance(mine[1], CorruptCheckpointError)


# -- crafted archives: each format feature, each hostile trick ----------------------------------------


def _raw(
    name: bytes, kind: bytes, *, size: int = 0, link: bytes = b"", mode: int = 0o644, magic: bytes = b"ustar\x0000"
) -> bytes:
    """One header block, fields as given (the writer under test would refuse some of them)."""
    block = bytearray(_tar.BLOCK)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = b"%07o\0" % mode
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % MTIME
    block[156:157] = kind
    block[157:257] = link[:100].ljust(100, b"\0")
    block[257:265] = magic
    return _with_checksum(bytes(block))


def _data(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % _tar.BLOCK)


def _end(body: bytes) -> bytes:
    return body + _tar.end_of_archive(len(body))


def _pax(kind: bytes, records: dict[bytes, bytes]) -> bytes:
    body = b"".join(_tar._pax_record(key, value) for key, value in records.items())
    return _raw(b"././@PaxHeader", kind, size=len(body)) + _data(body)


def _tarfile_sparse() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("sparse")
        info.size, info.type = 3, tarfile.GNUTYPE_SPARSE
        tar.addfile(info, io.BytesIO(b"abc"))
    return out.getvalue()


LONG = "x" * 150 + "/" + "y" * 150
SAME = "same tree"
BOTH_REFUSE = "both refuse"
#: name -> (archive, expectation): SAME, BOTH_REFUSE, or why only we refuse.
CRAFTED: dict[str, tuple[Callable[[], bytes], str]] = {
    "gnu long name and long link": (
        lambda: write([Entry(LONG, tarfile.REGTYPE, b"1"), Entry("s", tarfile.SYMTYPE, link=LONG)], tarfile.GNU_FORMAT),
        SAME,
    ),
    "gnu long hard link": (
        lambda: write(
            [Entry("y" * 200, tarfile.REGTYPE, b"1"), Entry("h" * 200, tarfile.LNKTYPE, link="y" * 200)],
            tarfile.GNU_FORMAT,
        ),
        SAME,
    ),
    "pax path, linkpath, mtime and utf-8": (
        lambda: write(
            [Entry("ü" * 90, tarfile.REGTYPE, b"2", mtime=-5), Entry("l", tarfile.SYMTYPE, link="ü" * 90)],
            tarfile.PAX_FORMAT,
        ),
        SAME,
    ),
    "ustar prefix": (lambda: write([Entry("p" * 120 + "/f", tarfile.REGTYPE, b"3")], tarfile.USTAR_FORMAT), SAME),
    "a later entry replaces an earlier one": (
        lambda: write([Entry("f", tarfile.REGTYPE, b"old"), Entry("f", tarfile.REGTYPE, b"new!")], tarfile.PAX_FORMAT),
        SAME,
    ),
    "a symlink with a size field carries no data": (
        lambda: _end(_raw(b"s", b"2", size=600, link=b"f") + _raw(b"f", b"0", size=2) + _data(b"ok")),
        SAME,
    ),
    "a folder and a hard link with a size field carry no data": (
        lambda: _end(
            _raw(b"f", b"0", size=2)
            + _data(b"ok")
            + _raw(b"d/", b"5", size=5, mode=0o755)
            + _raw(b"h", b"1", size=2, link=b"f")
            + _raw(b"g", b"0", size=1)
            + _data(b"g")
        ),
        SAME,
    ),
    "a global pax header applies to every later entry": (
        lambda: _end(
            _pax(b"g", {b"mtime": b"1234567890"})
            + _raw(b"a", b"0", size=1)
            + _data(b"a")
            + _raw(b"b", b"0", size=1)
            + _data(b"b")
        ),
        SAME,
    ),
    "a pre-POSIX folder: old file type, name ending in a slash": (
        lambda: _end(
            _raw(b"d/", b"\0", mode=0o755, magic=bytes(8)) + _raw(b"d/f", b"\0", size=1, magic=bytes(8)) + _data(b"v")
        ),
        SAME,
    ),
    "a number neither octal nor marked base-256 by 0x80 or 0xFF": (
        lambda: _end(_with_checksum(_raw(b"f", b"0")[:100] + b"\x81" + bytes(6) + b"\1" + _raw(b"f", b"0")[108:])),
        BOTH_REFUSE,
    ),
    "absolute name": (
        lambda: write([Entry("/etc/x", tarfile.REGTYPE, b"1")], tarfile.PAX_FORMAT),
        "tarfile strips the leading slash; we refuse the archive",
    ),
    "name climbing out": (lambda: write([Entry("../x", tarfile.REGTYPE, b"1")], tarfile.PAX_FORMAT), BOTH_REFUSE),
    "absolute symlink": (lambda: write([Entry("s", tarfile.SYMTYPE, link="/etc")], tarfile.PAX_FORMAT), BOTH_REFUSE),
    "symlink climbing out": (
        lambda: write([Entry("d/s", tarfile.SYMTYPE, link="../../x")], tarfile.PAX_FORMAT),
        BOTH_REFUSE,
    ),
    "symlink climbing out through another symlink, created after it": (
        lambda: write(
            [Entry("d/x", tarfile.SYMTYPE, link="up/.."), Entry("d/up", tarfile.SYMTYPE, link="..")], tarfile.PAX_FORMAT
        ),
        "tarfile checks each link against the tree so far; we check every link's way once all are in",
    ),
    "a file written through a symlink to a folder": (
        lambda: write(
            [Entry("d", tarfile.DIRTYPE), Entry("s", tarfile.SYMTYPE, link="d"), Entry("s/f", tarfile.REGTYPE, b"1")],
            tarfile.PAX_FORMAT,
        ),
        "tarfile follows the link as it stays inside; we never write through a link of the archive",
    ),
    "hard link to a path outside": (
        lambda: write([Entry("h", tarfile.LNKTYPE, link="../x")], tarfile.PAX_FORMAT),
        BOTH_REFUSE,
    ),
    "hard link to a file not in the archive": (
        lambda: write([Entry("h", tarfile.LNKTYPE, link="nowhere")], tarfile.PAX_FORMAT),
        BOTH_REFUSE,
    ),
    "character device": (lambda: write([Entry("c", tarfile.CHRTYPE)], tarfile.PAX_FORMAT), BOTH_REFUSE),
    "pipe": (lambda: write([Entry("p", tarfile.FIFOTYPE)], tarfile.PAX_FORMAT), BOTH_REFUSE),
    "old gnu sparse file": (_tarfile_sparse, "an unsupported entry type: refused, never restored wrong"),
    "corrupt checksum of the first header": (
        lambda: b"\1" + write([Entry("f", tarfile.REGTYPE, b"1")], tarfile.PAX_FORMAT)[1:],
        BOTH_REFUSE,
    ),
    "corrupt checksum of a later header": (
        lambda: (lambda a: a[: 512 * 2] + b"\1" + a[512 * 2 + 1 :])(
            write([Entry("f", tarfile.REGTYPE, b"1"), Entry("g", tarfile.REGTYPE, b"2")], tarfile.USTAR_FORMAT)
        ),
        BOTH_REFUSE,
    ),  # tarfile ends the archive there silently: counted as a refusal (module docstring)
    "truncated inside a file": (
        lambda: write([Entry("f", tarfile.REGTYPE, b"1" * 2000)], tarfile.PAX_FORMAT)[:1536],
        BOTH_REFUSE,
    ),
    "a gnu long name whose size was cut before its NUL": (
        lambda: _end(
            _raw(b"././@LongLink", b"L", size=4) + _data(b"long/name\0") + _raw(b"f", b"0", size=1) + _data(b"v")
        ),
        "tarfile reads the name on past its size up to a NUL; a damaged size: refused",
    ),
    "a plain file named as a folder (x/.)": (
        lambda: _end(_raw(b"x/.", b"0", size=1) + _data(b"v")),
        BOTH_REFUSE,
    ),
    "a plain file named x/..": (
        lambda: _end(_raw(b"d", b"5") + _raw(b"d/x/..", b"0", size=1) + _data(b"v")),
        BOTH_REFUSE,
    ),
    "a symlink named as a folder (x/.)": (
        lambda: _end(_raw(b"f", b"0", size=1) + _data(b"v") + _raw(b"x/.", b"2", link=b"f")),
        "a symlink cannot be made at x/.; tarfile makes one at x: refused",
    ),
    "a hard link to a folder-like name (f/.)": (
        lambda: _end(_raw(b"f", b"0", size=1) + _data(b"v") + _raw(b"h", b"1", link=b"f/.")),
        "f/. names a folder, which no file is; tarfile links to f: refused",
    ),
    "a gnu long name, then the end of the archive": (
        lambda: _end(_raw(b"././@LongLink", b"L", size=5) + _data(b"name\0")),
        BOTH_REFUSE,
    ),
    "a pax header, then the end of the archive": (lambda: _end(_pax(b"x", {b"path": b"name"})), BOTH_REFUSE),
    "plain files after a folder: a later one replaces an earlier one": (
        lambda: write(
            [Entry("d", tarfile.DIRTYPE, mode=0o755)]
            + [Entry(f"d/{n}", tarfile.REGTYPE, b"%d" % n, mode=0o640 + n % 2) for n in range(40)]
            + [Entry("d/7", tarfile.REGTYPE, b"new", mode=0o600), Entry("d/8", tarfile.REGTYPE, b"")],
            tarfile.USTAR_FORMAT,
        ),
        SAME,
    ),
    "a plain file named as a folder of the archive in its folder": (
        lambda: write(
            [
                Entry("d", tarfile.DIRTYPE),
                Entry("d/x", tarfile.DIRTYPE),
                Entry("d/a", tarfile.REGTYPE, b"1"),
                Entry("d/x", tarfile.REGTYPE, b"2"),
            ],
            tarfile.USTAR_FORMAT,
        ),
        BOTH_REFUSE,
    ),
    "no end-of-archive marker": (
        lambda: write([Entry("f", tarfile.REGTYPE, b"1")], tarfile.PAX_FORMAT)[:1024],
        BOTH_REFUSE,
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_archives_restore_as_tarfile_restores_them_or_are_refused(case: str, tmp_path: Path) -> None:
    make, expected = CRAFTED[case]
    mine, reference = both(make(), tmp_path)
    if expected == SAME:
        assert mine[0] == "ok", mine[1]
        assert mine == reference
    elif expected == BOTH_REFUSE:
        assert (mine[0], reference[0]) == ("refused", "refused"), (mine, reference)
        assert isinstance(mine[1], (CorruptCheckpointError, UnsafeArchiveError))
    else:  # stricter by design, for the reason given
        assert (mine[0], reference[0]) == ("refused", "ok"), (mine, reference)
        assert isinstance(mine[1], (CorruptCheckpointError, UnsafeArchiveError))
