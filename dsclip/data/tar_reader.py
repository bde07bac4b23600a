"""Reading a tar stream member by member, for shards: the same members Python's tarfile yields in
stream mode, at a fraction of its cost. tarfile builds a TarInfo per header and parses every pax
header in full; a shard written by webdataset's TarWriter (and by make-shards before 2026-12) has a
pax header before each of its three members per sample, and that parsing was a third of the
loader's time per image. Here a header is a few slices and an octal number. Compressed tars
(gzip, bzip2, xz) are read by tarfile, as before.
"""
import io
import tarfile
from typing import BinaryIO, Iterator, Optional

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # hard link, symlink, devices, folder, fifo
EXTENSIONS = (b"x", b"X", b"g", b"L")  # pax (POSIX, Solaris), global pax, GNU long name
TRAILER_LIMIT = 1 << 20  # at most this much is read after the end of the archive
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz
SKIP_CHUNK = 1 << 20


class TarFormatError(ValueError):
    """The stream is not a valid tar archive (a damaged shard)."""


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes, fewer only at the end of the stream (a pipe may return short reads)."""
    data = bytearray()
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return bytes(data)


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = _read_up_to(stream, size)
    if len(data) < size:
        raise EOFError(f"tar stream ended inside a member ({len(data)} of {size} bytes)")
    return data


def _skip(stream: BinaryIO, size: int) -> None:
    """Move past `size` bytes: a seek where the stream allows one, else reads of 1 MB."""
    try:
        if stream.seekable():
            stream.seek(size, io.SEEK_CUR)
            return
    except (AttributeError, OSError):
        pass
    while size > 0:
        chunk = stream.read(min(size, SKIP_CHUNK))
        if not chunk:
            raise EOFError("tar stream ended inside a member")
        size -= len(chunk)


def _drain(stream: BinaryIO) -> None:
    """Read what follows the end-of-archive block (the second one, a writer's record padding): a
    pipe's producer must be able to finish writing, or it fails with a broken pipe at close."""
    try:
        if stream.seekable():
            return
    except (AttributeError, OSError):
        pass
    _read_up_to(stream, TRAILER_LIMIT)


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or base-256 when its first bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"tar header field {field!r} is not a number") from None


def _check(header: bytes) -> None:
    # The checksum counts its own 8 bytes as spaces; old writers summed signed bytes.
    stored, rest = _number(header[148:156]), header[:148] + b" " * 8 + header[156:]
    if stored != sum(rest) and stored != sum(b - 256 if b > 127 else b for b in rest):
        raise TarFormatError("tar header checksum mismatch")


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """Records "LENGTH KEY=VALUE\\n" of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        space = data.find(b" ", position)
        length = int(data[position:space]) if data[position:space].isdigit() else 0
        end = position + length
        if space < 0 or end <= space + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarFormatError(f"malformed pax header record at byte {position}")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position = end
    return records


def _member_size(header: bytes, extended: dict[str, str]) -> int:
    size = extended.get("size")
    if size is None:
        return _number(header[124:136])
    if not size.isdigit():
        raise TarFormatError(f"pax size {size!r} is not a size")
    return int(size)


def _plain_members(stream: BinaryIO, first: bytes, max_bytes: int) -> Iterator[tuple[str, Optional[bytes]]]:
    header, extended = first, {}
    while header and header != bytes(BLOCK):
        if len(header) < BLOCK:
            raise EOFError("tar stream ended inside a header")
        _check(header)
        kind = header[156:157]
        if kind in EXTENSIONS:  # pax header of the next member, global pax header, GNU long name
            size = _number(header[124:136])
            data = _read_exact(stream, size)
            _skip(stream, -size % BLOCK)
            if kind in (b"x", b"X"):
                extended.update(_pax_records(data))
            elif kind == b"L":
                extended["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        else:
            name, size = extended.get("path") or _name(header), _member_size(header, extended)
            extended = {}
            if kind in NO_DATA:  # links, devices, folders, fifos: no data blocks follow, whatever size says
                pass
            elif kind in REGULAR and size <= max_bytes:
                yield name, _read_exact(stream, size)
                _skip(stream, -size % BLOCK)
            else:
                _skip(stream, size + -size % BLOCK)
                if kind in REGULAR:
                    yield name, None
        header = _read_up_to(stream, BLOCK)
    if header:
        _drain(stream)


class _Replay(io.RawIOBase):
    """`stream` with `head`, already read from it, put back in front (for tarfile)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.head:
            part, self.head = (self.head, b"") if size < 0 or size >= len(self.head) else \
                (self.head[:size], self.head[size:])
            return part
        return self.stream.read(size)


def tar_file_members(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[str, Optional[bytes]]]:
    """(name, data) of each regular file of a tar stream, in order; data is None for a member above
    `max_bytes`, which is skipped unread. A damaged archive raises TarFormatError or EOFError, a
    failed read OSError."""
    first = _read_up_to(stream, BLOCK)
    if not first:
        raise TarFormatError("empty file: not a tar archive")
    if first.startswith(COMPRESSED):
        with tarfile.open(fileobj=_Replay(first, stream), mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, None if info.size > max_bytes else tar.extractfile(info).read()
        return
    yield from _plain_members(stream, first, max_bytes)
