import pytest

from obsdiff.errors import OutputExistsError
from obsdiff.runs.artifacts import staged_dir, staged_file


def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out) as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(OutputExistsError, match="--force"), staged_dir(out):
        pass
    with staged_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_staged_file_keeps_the_original_on_failure(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), staged_file(f, force=True) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError("disk full")
    assert f.read_bytes() == b"old" and list(tmp_path.iterdir()) == [f]
