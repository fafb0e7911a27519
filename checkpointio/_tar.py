"""The tar format, lean: header encoding for saves, and safe extraction of a tar stream.

:mod:`tarfile` spends 100-300 microseconds per entry (object copies, pax bookkeeping, stream
buffering, a ``realpath`` per entry in its ``data`` filter); a tree of 50,000 small files then
takes longer to pack or restore than to transfer. Here headers are built and parsed directly
(ustar with POSIX pax records where needed; reading also GNU long names: what ``tarfile``, GNU tar
and bsdtar write) and files are written with plain ``os`` calls.

Safety follows PEP 706's ``data`` filter, checked with string operations only. That is enough
because the destination is a folder the caller just created: the only links that can redirect a
path are those this archive created, and they are tracked. Refused: absolute names, ``..``, names
or hard links through a symlink the archive made, symlinks pointing out of the folder (directly or
through another symlink of the archive, in either order), hard links to anything but a file
extracted before (and still a file), devices and pipes. Modes lose set-id, sticky and
group/other write bits; owners are not applied.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from collections.abc import Callable

from ._exceptions import CorruptCheckpointError, UnsafeArchiveError

__all__ = [
    "BLOCK",
    "DIRECTORY",
    "FILE",
    "HARD_LINK",
    "SYMLINK",
    "end_of_archive",
    "extract",
    "header",
    "is_header",
    "link_way",
]

Read = Callable[[int], bytes]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
FILE, HARD_LINK, SYMLINK, DIRECTORY = b"0", b"1", b"2", b"5"
_FILE_TYPES = (b"0", b"\0", b"7")
_SPECIAL_TYPES = {b"3": "character device", b"4": "block device", b"6": "pipe"}
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_STEP = 1024 * 1024


_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")
_RECORD = 20 * BLOCK  # archives end on a multiple of this, as tar(1) writes them
_MAX_OCTAL_11 = 8**11
#: The times a file can have (a 64-bit ``time_t``): ``os.utime`` raises OverflowError beyond them.
_MIN_TIME, _MAX_TIME = -(2**63), 2**63 - 1
#: Most bytes a pax or GNU long-name header may hold: they are read whole (a name is at most a few
#: KiB), so without a bound a crafted header could make extraction hold gigabytes.
_MAX_META = 1024 * 1024
#: Longest name or link target: what a path may be on Linux (PATH_MAX, with its NUL). The checks
#: walk a name's folders, so a 1 MiB name of 500,000 parts would cost quadratic time and memory
#: (1.5 GiB for a 257-byte archive); a longer one could not be created anyway.
_MAX_NAME = 4095


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


_ZERO_8 = _octal(0, 8)  # owner, group and device numbers: always zero (a restore belongs to its user)


def _ustar(name: bytes, kind: bytes, size: int, mode: int, mtime: int, link: bytes) -> bytes:
    fields = _USTAR.pack(
        name[:100], _octal(mode, 8), _ZERO_8, _ZERO_8, _octal(size, 12), _octal(mtime, 12),
        b"        ", kind, link[:100], b"ustar\0", b"00", b"", b"", _ZERO_8, _ZERO_8, b"", b"",
    )  # fmt: skip
    return fields[:148] + b"%06o\0 " % (_byte_sum(fields[:256]) + _byte_sum(fields[256:])) + fields[156:]


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def header(name: str, kind: bytes, *, size: int = 0, mode: int = 0, mtime: int = 0, link: str = "") -> bytes:
    """The header block(s) of one entry: ustar, preceded by a pax header when a field needs one
    (long or non-ASCII names and link targets, sizes from 8 GiB, mtimes out of ustar's range)."""
    raw_name = name.encode("utf-8", "surrogateescape")
    raw_link = link.encode("utf-8", "surrogateescape")
    records = []
    if len(raw_name) > 100 or not name.isascii():
        records.append(_pax_record(b"path", raw_name))
    if len(raw_link) > 100 or not link.isascii():
        records.append(_pax_record(b"linkpath", raw_link))
    if size >= _MAX_OCTAL_11:
        records.append(_pax_record(b"size", str(size).encode()))
        size = 0
    if not 0 <= mtime < _MAX_OCTAL_11:
        records.append(_pax_record(b"mtime", str(mtime).encode()))
        mtime = 0
    entry = _ustar(raw_name, kind, size, mode, mtime, raw_link)
    if not records:
        return entry
    try:
        (raw_name + raw_link).decode("utf-8")
    except UnicodeDecodeError:  # not UTF-8 (a name the filesystem holds as raw bytes)
        records.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
    pax = b"".join(records)
    return _ustar(b"././@PaxHeader", b"x", len(pax), 0o644, 0, b"") + pax + bytes(-len(pax) % BLOCK) + entry


def end_of_archive(position: int) -> bytes:
    """Two zero blocks, then zeros up to the next whole record, given the bytes written so far."""
    end = position + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % _RECORD))


def _number(field: bytes, *, signed: bool = False) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set.

    Only a ``signed`` field (a time: GNU tar writes files from before 1970 so) may be negative,
    base-256 with a first byte of 0xFF; a negative size or mode is refused.
    """
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:
            if not signed:
                raise CorruptCheckpointError("a tar header holds a negative number")
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text.isdigit():  # int() would also take a sign ("-1": a negative size), "_" and spaces
        if not text:
            return 0
        raise CorruptCheckpointError(f"a tar header holds a bad number {text!r}")
    try:
        return int(text, 8)
    except ValueError:  # 8 or 9
        raise CorruptCheckpointError(f"a tar header holds a bad number {text!r}") from None


_PAX_TIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")


def _pax_time(value: bytes) -> int:
    """A pax time record (decimal seconds, maybe negative, maybe with a fraction), floored to
    whole seconds as file systems count them (-1.5 is second -2).

    Parsed as text: ``float`` would round 1700000000.999999999 up to the next second, and would
    read ``inf``, ``nan`` and ``1e400``, which no file can have.
    """
    match = _PAX_TIME.fullmatch(value)
    if match is None:
        raise CorruptCheckpointError(f"a pax header holds a bad time {value!r}")
    seconds = int(match[2])
    if match[1]:
        seconds = -seconds - (1 if match[3] and match[3].strip(b"0") else 0)
    return seconds


def _byte_sum(data: bytes | memoryview) -> int:
    """The sum of the bytes of ``data`` (at most 256 of them): Adler-32's low half minus one.

    Below 257 bytes the sum cannot reach Adler-32's modulus (65521), and zlib adds in C what
    ``sum()`` adds one Python int at a time (a tenth of the time: headers are checked per file).
    """
    return (zlib.adler32(data) & 0xFFFF) - 1


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    with memoryview(block) as view:
        unsigned = _byte_sum(view[:256]) + _byte_sum(view[256:BLOCK]) - sum(view[148:156]) + 256
    if stored == unsigned:
        return True
    signed = 256 + sum(b - 256 if b > 127 else b for b in block[:148] + block[156:])
    return stored == signed


def is_header(block: bytes) -> bool:
    """Whether ``block`` is a valid tar header (what an archive starts with)."""
    if len(block) < BLOCK or block[:BLOCK] == _ZERO_BLOCK:
        return False
    try:
        return _checksum_ok(block[:BLOCK])
    except CorruptCheckpointError:
        return False


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        if space < 0:
            raise CorruptCheckpointError("a pax header is garbled")
        try:
            length = int(data[position:space])
        except ValueError:
            raise CorruptCheckpointError("a pax header is garbled") from None
        record = data[space + 1 : position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise CorruptCheckpointError("a pax header is garbled")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("ascii", "replace")] = value
        position += length
    return records


class _Extraction:
    def __init__(self, read: Read, dest: str | None) -> None:
        self._read = read
        self._dest = dest or ""
        self._write = dest is not None  # False: check everything, write nothing
        self._links: set[str] = set()
        self._files: set[str] = set()
        self._dirs: set[str] = {""}
        #: Folder path -> (mode, mtime), applied at the end; keyed by path, so a crafted archive
        #: naming one folder a million times holds one entry (a list held 50x the archive's size).
        self._dir_attrs: dict[str, tuple[int, int]] = {}
        self._umask = _creation_umask(dest)
        #: Paths that earlier symlinks' targets pass through: no symlink may appear there later.
        self._walked: set[str] = set()

    def read_exact(self, size: int) -> bytes:
        data = self._read(size)
        if len(data) != size:
            raise CorruptCheckpointError("the archive is truncated: it ends inside an entry")
        return data

    def skip(self, size: int) -> None:
        while size:
            size -= len(self.read_exact(min(size, _STEP)))

    def read_padded(self, size: int) -> bytes:
        data = self.read_exact(size)
        self.skip(-size % BLOCK)
        return data

    def inside(self, name: str, what: str) -> str:
        """``name`` normalised, or refused if it would land outside the folder."""
        if name.startswith("/") or os.path.isabs(name):
            raise UnsafeArchiveError(f"{what} {name!r} is an absolute path")
        normal = os.path.normpath(name)  # relative, no "." or empty parts, no trailing "/"
        if normal == ".." or normal.startswith("../"):
            raise UnsafeArchiveError(f"{what} {name!r} would be outside the destination")
        if self._links:
            parent = _parent(normal)
            while parent:
                if parent in self._links:
                    raise UnsafeArchiveError(f"{what} {name!r} goes through the symlink {parent!r}")
                parent = _parent(parent)
        return normal

    def make_parents(self, rel: str) -> None:
        """Create the folders ``rel`` is in, refusing to go through a file the archive made
        (``os.makedirs`` would fail on it with an OSError that says nothing of the archive)."""
        parent = _parent(rel)
        if parent in self._dirs:
            return
        new = []
        while parent and parent not in self._dirs:
            if parent in self._files:
                raise CorruptCheckpointError(f"entry {rel!r} is inside {parent!r}, a file of the archive")
            new.append(parent)
            parent = _parent(parent)
        if self._write:
            os.makedirs(os.path.join(self._dest, new[0]), exist_ok=True)
        self._dirs.update(new)

    def clear(self, rel: str, path: str) -> None:
        """Remove what an earlier entry of the same name left, unless it is a folder.

        The destination starts empty, so only a name this archive already wrote can be there:
        no ``stat`` for the others (one system call less per file).
        """
        if not self._write or not (rel in self._files or rel in self._links or rel in self._dirs):
            return
        if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path)):
            os.unlink(path)

    def run(self) -> None:
        self.entries()
        for path, (mode, mtime) in (
            sorted(self._dir_attrs.items(), reverse=True) if self._write else ()
        ):  # deepest first
            os.chmod(path, mode)
            os.utime(path, (mtime, mtime))

    def entries(self) -> None:
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                raise CorruptCheckpointError("the archive is truncated: no end-of-archive marker")
            if block == _ZERO_BLOCK:
                break
            if not _checksum_ok(block):
                raise CorruptCheckpointError("the archive is corrupt: a tar header fails its checksum")
            name, raw_mode, _, _, raw_size, raw_mtime, _, kind, link, magic, _, _, _, _, _, prefix, _ = (
                _USTAR.unpack_from(block)
            )
            size = _number(raw_size)
            if kind in (b"x", b"g", b"L", b"K") and size > _MAX_META:
                raise CorruptCheckpointError(f"a {kind.decode()!r} header of {size} bytes (more than 1 MiB): refused")
            if kind in (b"x", b"g"):
                records = _pax_records(self.read_padded(size))
                if kind == b"x":
                    pax = records
                continue
            if kind in (b"L", b"K"):
                value = self.read_padded(size).split(b"\0", 1)[0]
                if kind == b"L":
                    long_name = value
                else:
                    long_link = value
                continue
            name = name.split(b"\0", 1)[0]
            if magic[:5] == b"ustar" and prefix[:1] != b"\0":
                name = prefix.split(b"\0", 1)[0] + b"/" + name
            link = link.split(b"\0", 1)[0]
            mode = _number(raw_mode) & 0o7777
            if pax or long_name is not None or long_link is not None:
                name = pax.get("path", long_name if long_name is not None else name)
                link = pax.get("linkpath", long_link if long_link is not None else link)
                if "size" in pax:
                    if not pax["size"].isdigit():
                        raise CorruptCheckpointError(f"a pax header holds a bad size {pax['size']!r}")
                    size = int(pax["size"])
                mtime = _pax_time(pax["mtime"]) if "mtime" in pax else _number(raw_mtime, signed=True)
                sparse = any(key.startswith("GNU.sparse.") for key in pax)
                pax, long_name, long_link = {}, None, None
                if b"\0" in name or b"\0" in link:  # only pax records can hold one: os calls refuse it
                    raise CorruptCheckpointError(f"a pax header holds a name with a NUL byte {name!r}")
                if sparse:  # GNU tar's pax sparse files: the data is a map and fragments, not the file
                    raise CorruptCheckpointError(f"entry {_text(name)!r} is a GNU sparse file, which is not supported")
            else:
                mtime = _number(raw_mtime, signed=True)
            if not _MIN_TIME <= mtime <= _MAX_TIME:  # pax or GNU base-256 numbers can hold more
                raise CorruptCheckpointError(f"entry {_text(name)!r} has an out-of-range time {mtime}")
            if len(name) > _MAX_NAME or len(link) > _MAX_NAME:
                raise CorruptCheckpointError(
                    f"entry {_text(name[:100])!r}... has a name or link target over {_MAX_NAME} bytes"
                )
            self.entry(kind, _text(name), _text(link), size, mode, mtime)

    def entry(self, kind: bytes, name: str, link: str, size: int, mode: int, mtime: int) -> None:
        rel = self.inside(name, "entry")
        if kind in _SPECIAL_TYPES:
            raise UnsafeArchiveError(f"entry {name!r} is a {_SPECIAL_TYPES[kind]}")
        path = f"{self._dest}/{rel}" if self._write else ""  # rel is normalised and relative
        if rel == ".":
            if kind != b"5":
                raise UnsafeArchiveError(f"entry {name!r} would replace the destination")
            self._dir_attrs[path] = (mode & 0o755 | 0o700, mtime)
            self.skip(size + (-size % BLOCK))
            return
        self.make_parents(rel)
        if rel in self._dirs and kind in (*_FILE_TYPES, b"1", b"2"):  # clear() keeps folders: EEXIST
            raise CorruptCheckpointError(f"entry {name!r} would replace a folder of the archive")
        if kind in _FILE_TYPES:
            self.clear(rel, path)
            self.write_file(path, size, mode, mtime)
            self._files.add(rel)
        elif kind == b"5":
            self._files.discard(rel)
            self._links.discard(rel)
            if self._write and (not os.path.isdir(path) or os.path.islink(path)):
                self.clear(rel, path)
                os.mkdir(path, 0o700)
            self._dirs.add(rel)
            self._dir_attrs[path] = (mode & 0o755 | 0o700, mtime)
            self.skip(size + (-size % BLOCK))
        elif kind == b"2":
            self.check_link_target(rel, name, link)
            self.clear(rel, path)
            if self._write:
                os.symlink(link, path)
                os.utime(path, (mtime, mtime), follow_symlinks=False)
            self._files.discard(rel)
            self._links.add(rel)
            self.skip(size + (-size % BLOCK))
        elif kind == b"1":
            source = self.inside(link, "hard link target")
            if source not in self._files:
                raise UnsafeArchiveError(f"hard link {name!r} -> {link!r} is not to a file extracted before")
            if source != rel:  # a link to itself (GNU tar's for a linked file named twice) is already there
                self.clear(rel, path)
                if self._write:
                    os.link(os.path.join(self._dest, source), path, follow_symlinks=False)
            self._links.discard(rel)
            self._files.add(rel)
            self.skip(size + (-size % BLOCK))
        else:
            raise CorruptCheckpointError(f"entry {name!r} has an unsupported type {kind!r}")

    def check_link_target(self, rel: str, name: str, link: str) -> None:
        """Refuse a symlink whose target leaves the folder, now or once later links exist.

        The target is walked from the link's folder: ``..`` may not climb out, and no part of the
        way may be a symlink this archive made (``d/up -> ..`` then ``d/x -> up/..`` would leave
        it). The parts walked are remembered, so a symlink made there later is refused too.
        """
        if not link:  # os.symlink refuses it (ENOENT)
            raise CorruptCheckpointError(f"symlink {name!r} has an empty target")
        if link.startswith("/") or os.path.isabs(link):
            raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} points to an absolute path")
        way = link_way(rel, link)
        if way is None:
            raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} points outside the destination")
        for here in way:
            if here in self._links:
                raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} goes through the symlink {here!r}")
        if rel in self._walked:
            raise UnsafeArchiveError(f"symlink {name!r} would redirect the target of an earlier symlink")
        self._walked.update(way)

    def write_file(self, path: str, size: int, mode: int, mtime: int) -> None:
        if not self._write:
            self.skip(size + (-size % BLOCK))
            return
        mode = _file_mode(mode)
        padded = size + (-size % BLOCK)
        fd = os.open(path, _WRITE_FLAGS, mode)
        try:
            if padded <= _STEP:  # the common case: data and padding in one read
                _write_all(fd, memoryview(self.read_exact(padded))[:size])
            else:
                remaining = size
                while remaining:
                    chunk = self.read_exact(min(remaining, _STEP))
                    remaining -= len(chunk)
                    _write_all(fd, memoryview(chunk))
            _finish(fd, mode, mtime, self._umask)
        finally:
            os.close(fd)
        if padded > _STEP:
            self.skip(padded - size)


def link_way(rel: str, link: str) -> list[str] | None:
    """The folders (relative to the top) that the relative symlink ``rel -> link`` walks through
    from its own folder, ``..`` going up a level; ``None`` if the way climbs above the top.

    One walk for extraction (none of them may be a symlink of the archive) and for saving (which
    refuses, up front, what extraction would).
    """
    parts = rel.split("/")[:-1]
    steps = [step for step in link.split("/") if step not in ("", ".")]
    way = []
    for index, step in enumerate(steps):
        if step == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(step)
        if index < len(steps) - 1:
            way.append("/".join(parts))
    return way


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _parent(normal: str) -> str:
    """``os.path.dirname`` of a normalised relative path, for a fraction of its cost."""
    return normal.rpartition("/")[0]


def _file_mode(mode: int) -> int:
    """The mode a restored file gets: owner read/write always, no set-id or sticky bits, no write
    for group and others, and execute for group and others only along with the owner's."""
    mode = mode & 0o755 | 0o600
    if not mode & 0o100:
        mode &= ~0o011
    return mode


def _creation_umask(dest: str | None) -> int | None:
    """What creating a file in ``dest`` takes away from the mode asked for, when that is known:
    the process umask, unless ``dest`` has a default ACL (which then applies instead)."""
    if dest is None:
        return None
    try:
        os.getxattr(dest, "system.posix_acl_default")
        return None  # a default ACL: always fchmod
    except OSError as error:
        if error.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
    except AttributeError:  # pragma: no cover - no xattrs on this platform (and no /proc either)
        return None
    return _umask()


def _umask() -> int | None:
    """The process umask, read without changing it (``os.umask`` can only swap it, a race with
    other threads creating files); ``None`` where ``/proc`` does not tell it."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _finish(fd: int, mode: int, mtime: int, umask: int | None) -> None:
    """Give an open file its mode (unless creating it already did) and its modification time."""
    if umask is None or mode & umask:
        os.fchmod(fd, mode)
    os.utime(fd, (mtime, mtime))


def extract(read: Read, dest: str | None) -> None:
    """Extract the tar stream ``read`` gives into the new, empty folder ``dest``.

    With ``dest=None`` every header, rule and byte is checked the same way and nothing is written
    (``checkpointio verify``).

    Raises:
        UnsafeArchiveError: An entry would be written outside ``dest`` or is a device.
        CorruptCheckpointError: The stream is truncated, garbled or of an unsupported kind.
    """
    _Extraction(read, dest).run()
