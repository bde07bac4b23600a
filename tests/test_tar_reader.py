"""dsclip's tar reader yields what tarfile yields, on every header kind a shard writer produces."""
import gzip
import io
import tarfile

import pytest

from dsclip.data.tar_reader import TarFormatError, tar_file_members

LONG = "deep/" * 30 + "sample.with.many.dots.jpg"  # above ustar's 100 + 155 characters
MEMBERS = {"a/000001.jpg": b"\xff\xd8" + bytes(range(256)) * 7, "a/000001.txt": "a caption, déjà vu".encode(),
           "a/000001.json": b'{"label": 3}', "x" * 99 + ".txt": b"", LONG: b"long name", "big.bin": b"\1" * 5000}


def archive(fmt: int, members: dict[str, bytes] = MEMBERS, compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5  # a fractional mtime: a pax header in PAX_FORMAT
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link")
        link.type, link.linkname = tarfile.SYMTYPE, "000001.jpg"
        tar.addfile(link)
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


class Pipe(io.RawIOBase):
    """A stream that cannot seek and returns short reads, as a pipe does."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(size, 100) if size >= 0 else size)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("stream", [io.BytesIO, Pipe], ids=["file", "pipe"])
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_members_equal_tarfiles(fmt, stream, compress):
    data = archive(fmt, compress=compress)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        expected = [(info.name, None if info.size > 4096 else tar.extractfile(info).read())
                    for info in tar if info.isreg()]
    assert list(tar_file_members(stream(data), max_bytes=4096)) == expected
    assert (LONG, b"long name") in expected and ("big.bin", None) in expected


def test_a_ustar_archive_joins_the_name_prefix():
    name = "p" * 120 + "/" + "n" * 90  # fits ustar only through its 155-character prefix field
    data = archive(tarfile.USTAR_FORMAT, {name: b"x"})
    assert list(tar_file_members(io.BytesIO(data), 100)) == [(name, b"x")]


def test_damaged_archives_raise_format_errors():
    data = bytearray(archive(tarfile.PAX_FORMAT))
    with pytest.raises(EOFError):
        list(tar_file_members(io.BytesIO(bytes(data[:3000])), 1 << 20))  # cut inside a member
    data[600] ^= 0xFF  # a byte of the second header
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_file_members(io.BytesIO(bytes(data)), 1 << 20))
    with pytest.raises(TarFormatError, match="empty file"):
        list(tar_file_members(io.BytesIO(b""), 1 << 20))


def pax_archive(records: bytes) -> bytes:
    """An archive whose first member has a pax header with `records` as they are, valid or not."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, len(records)
        tar.addfile(pax, io.BytesIO(records))
        for name in ("0.txt", "1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
    return buffer.getvalue()


def test_pax_headers_are_applied_and_malformed_ones_are_damage_not_a_hang():
    assert list(tar_file_members(io.BytesIO(pax_archive(b"14 path=a.jpg\n")), 100)) == [("a.jpg", b"data"),
                                                                                         ("1.txt", b"data")]
    for records in (b"0 path=zz\n", b"9 size=-1\n", b"99 path=a.jpg\n", b"14 path=a.jpgX"):
        with pytest.raises(TarFormatError):
            list(tar_file_members(io.BytesIO(pax_archive(records)), 100))


def test_a_pipe_is_read_to_its_end_after_the_archive():
    """The writer's record padding after the end-of-archive block is read too: a pipe's producer
    still writing it must not fail with a broken pipe."""
    pipe = Pipe(archive(tarfile.PAX_FORMAT) + bytes(20000))
    list(tar_file_members(pipe, 1 << 20))
    assert pipe.read(1) == b""
