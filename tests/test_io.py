"""The one writer and the readers of mumic.io: permissions, atomicity, error messages."""

import os
import stat
import threading

import pytest

from mumic.errors import ConfigError, RunError
from mumic.io import atomic_folder, atomic_write_text, file_digest, file_sha256, save_tensors
from mumic.readers import read_json, read_text, read_yaml


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    """mkstemp makes 0600 files; a run must be readable by whoever the umask allows."""
    import torch

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_tensors(tmp_path / "w.safetensors", {"t": torch.zeros(2)})
        with atomic_folder(tmp_path / "folder") as d:
            (d / "f").write_text("y")
        plain = tmp_path / "plain.txt"
        plain.write_text("z")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == _mode(plain) == 0o666 & ~umask
    assert _mode(tmp_path / "w.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == 0o777 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(ZeroDivisionError):
        from mumic.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise ZeroDivisionError("fails inside the block")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_two_folder_writers_do_not_share_a_temporary_folder(tmp_path):
    """Each writer builds in its own temporary folder (one fixed name let one writer wipe
    the other's); the swaps themselves happen one after the other here."""
    out = tmp_path / "index"
    inside = threading.Barrier(2)
    a_done = threading.Event()
    seen = []

    def write(tag):
        with atomic_folder(out) as d:
            seen.append(d)
            (d / "who").write_text(tag)
            inside.wait(timeout=10)  # both temporary folders exist at once
            if tag == "b":
                a_done.wait(timeout=10)
            assert (d / "who").read_text() == tag  # nobody wiped it
        if tag == "a":
            a_done.set()

    threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2
    assert (out / "who").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_digests_match_hashlib(tmp_path):
    import hashlib

    p = tmp_path / "f.bin"
    data = os.urandom(3 << 20)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_digest(p, "blake2b", digest_size=16) == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_utf8_errors_name_the_right_line_after_a_bom(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xef\xbb\xbfa: 1\nb: \xe9\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 2: not valid UTF-8 \(byte 0xe9\)"):
        read_text(p, error=ConfigError)


def test_yaml_duplicate_keys_are_refused_at_any_depth(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\nb:\n  x: 1\n  x: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 4: key 'x' is given twice \(first on line 3\); keep one"):
        read_yaml(p, error=ConfigError)
    p.write_text("a: 1\nb: {x: 2}\n")
    assert read_yaml(p) == ({"a": 1, "b": {"x": 2}}, {"a": 1, "b": 2})
    p.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RunError, match="not valid YAML"):
        read_yaml(p)


def test_json_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1,\n "a": 2}')
    assert read_json(p) == {"a": 2}
    with pytest.raises(RunError, match=r"x\.json: duplicate key 'a'; keep one"):
        read_json(p, unique_keys=True)
    p.write_text('{"a": 1,\n ]')
    with pytest.raises(RunError, match=r"x\.json line 2: not valid JSON"):
        read_json(p)
