import json
import os
import stat

import pytest

from tinyskip import atomic


@pytest.fixture
def private_umask():
    """Write as a user whose umask makes files owner-only: the policy must still hold."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(atomic, "_fsync", lambda p: events.append(("fsync", str(p))))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))),
                                                     replace(a, b)))
    atomic.write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert events[1:] == [("rename", str(tmp_path / "r.json")), ("fsync", str(tmp_path))]


def test_written_files_and_folders_follow_one_permission_policy(tmp_path, private_umask):
    atomic.write_json_atomic(tmp_path / "r.json", [1])
    atomic.append_text(tmp_path / "log.jsonl", "{}\n")
    atomic.make_dirs(tmp_path / "a" / "b")
    tmp = atomic.temp_dir(tmp_path, ".t-")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "w.bin").write_bytes(b"x")
    atomic.publish_dir(tmp, tmp_path / "pub")
    assert json.loads((tmp_path / "r.json").read_text()) == [1]
    assert {p: mode(tmp_path / p) for p in ("r.json", "log.jsonl", "pub/sub/w.bin")} == \
        dict.fromkeys(("r.json", "log.jsonl", "pub/sub/w.bin"), 0o644)
    assert {p: mode(tmp_path / p) for p in ("a", "a/b", "pub", "pub/sub")} == \
        dict.fromkeys(("a", "a/b", "pub", "pub/sub"), 0o755)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "r.json").write_text("old")
    with pytest.raises(TypeError):
        atomic.write_json_atomic(tmp_path / "r.json", {"not json": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old"


def test_a_published_folder_never_replaces_a_full_one_unless_backed_up(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "f").write_text("old")
    tmp = atomic.temp_dir(tmp_path, ".t-")
    (tmp / "f").write_text("new")
    with pytest.raises(OSError):
        atomic.publish_dir(tmp, final)
    atomic.publish_dir(tmp, final, backup=tmp_path / "old")
    assert (final / "f").read_text() == "new" and (tmp_path / "old" / "f").read_text() == "old"
