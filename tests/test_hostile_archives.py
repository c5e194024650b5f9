"""Hostile archives for ``dissect data download``: members that inflate a thousandfold, members that declare
more than the free disk, members that lie about their size, unsafe member paths — each refused before a byte
is unpacked, with nothing left that looks like a dataset. The archives are served by the local HTTP server
of tests/test_download.py, as a mirror would serve them."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from netdissection.core.errors import DissectionError
from netdissection.plugins.datasets.download import check_archive

from .test_download import NAME, broden_zip, server  # noqa: F401  (fixtures)


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def deflated(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def zip64_declaring(name: str, data: bytes, declared: int) -> bytes:
    """A one-member stored zip (ZIP64) whose directory says the member is ``declared`` bytes, compressed and
    not: what a hostile archive may claim. Written by hand: zipfile writes only the truth."""
    filename = name.encode()
    crc = zlib.crc32(data) & 0xFFFFFFFF
    extra = struct.pack("<HHQQ", 0x0001, 16, declared, declared)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(filename), len(extra)) + filename + extra + data
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                          len(filename), len(extra), 0, 0, 0, 0, 0) + filename + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def test_a_member_inflating_a_thousandfold_is_refused_before_unpacking(run_cli, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    url, archive = server
    archive.payload = deflated({f"{NAME}/index.csv": b"image,split\n", f"{NAME}/images/bomb.png": bytes(20_000_000)})
    assert len(archive.payload) < 40_000
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "is a zip bomb: its member 'broden1_224/images/bomb.png' inflates" in err and "deleted" in err
    assert _leftovers(tmp_path) == []  # the hostile archive is gone, and nothing was unpacked


def test_many_small_members_inflating_a_thousandfold_are_refused(tmp_path: Path) -> None:
    """No member is large, the archive as a whole inflates 1,000×."""
    path = tmp_path / "many.zip"
    path.write_bytes(deflated({f"d/{i}.csv": bytes(900_000) for i in range(150)}))
    with pytest.raises(DissectionError, match=r"many\.zip is a zip bomb: its 150 members inflate .* to 135\.0 MB"):
        check_archive(path, tmp_path)


def test_members_declaring_more_than_the_free_disk_are_refused_and_kept(run_cli, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    url, archive = server
    free = shutil.disk_usage(tmp_path).free
    archive.payload = zip64_declaring(f"{NAME}/index.csv", b"image\n", free + 10**9)
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path, "--keep-zip")
    assert code == 2 and "Traceback" not in err
    assert f"unpacking {NAME}.zip needs" in err and f"{tmp_path} has" in err and "free" in err
    assert _leftovers(tmp_path) == [f"{NAME}.zip"]  # kept for another --dest; nothing unpacked


def test_a_member_larger_than_it_declares_is_cut_and_fails_its_crc(tmp_path: Path) -> None:
    """The limits trust the declared sizes because zipfile holds every member to them."""
    data = deflated({"big.bin": bytes(5_000_000)})
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    lied = bytearray(data)
    for offset in (info.header_offset + 22, data.rindex(b"PK\x01\x02") + 24):  # local and central sizes
        lied[offset:offset + 4] = struct.pack("<I", 1000)
    (tmp_path / "lie.zip").write_bytes(bytes(lied))
    with pytest.raises(DissectionError, match=r"lie\.zip is corrupt"):
        check_archive(tmp_path / "lie.zip", tmp_path)


@pytest.mark.parametrize("member", ["/etc/evil", "../evil", "broden1_224/../../evil", "C:\\evil", "a\nb"])
def test_unsafe_member_paths_are_refused(tmp_path: Path, member: str) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"x")
    (tmp_path / "a.zip").write_bytes(out.getvalue())
    with pytest.raises(DissectionError, match="unsafe path"):
        check_archive(tmp_path / "a.zip", tmp_path)


def test_a_real_broden_archive_passes_the_checks(broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    (tmp_path / "b.zip").write_bytes(broden_zip[0])
    assert check_archive(tmp_path / "b.zip", tmp_path) > 0
