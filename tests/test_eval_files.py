"""`simone eval --data` reads a folder by curation's file rules: regular files inside the folder
only, a size cap, and one line for each file it leaves out."""

from __future__ import annotations

import os

import pytest

from simone.inference.text_bpb import format_table, read_text_folder


@pytest.fixture
def folder(tmp_path):
    """data/poetry/a.txt (read) beside things that must not be read."""
    data = tmp_path / "data"
    (data / "poetry").mkdir(parents=True)
    (data / "poetry" / "a.txt").write_text("Love and sorrow, summer and winter.\n")
    return data


def read(data, **kwargs):
    skipped = []
    files = read_text_folder(data, on_skip=skipped.append, **kwargs)
    return [f.path.relative_to(data).as_posix() for f in files], skipped


@pytest.mark.timeout(20)  # without curation's rules, opening the FIFO blocks for ever
def test_a_fifo_named_txt_is_skipped_not_waited_on(folder):
    os.mkfifo(folder / "poetry" / "pipe.txt")
    names, skipped = read(folder)
    assert names == ["poetry/a.txt"]
    assert skipped == ["poetry/pipe.txt: not a regular file (a FIFO); not opened"]


def test_links_are_followed_inside_the_folder_only(folder, tmp_path):
    (tmp_path / "secret.txt").write_text("outside the data folder\n")
    (folder / "poetry" / "out.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "poetry" / "again.txt").symlink_to(folder / "poetry" / "a.txt")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    names, skipped = read(folder)
    assert names == ["poetry/a.txt", "poetry/again.txt"]
    assert len(skipped) == 2
    assert skipped[0].startswith("linked: symlinked folder: not followed")
    assert skipped[1].startswith("poetry/out.txt: links outside the corpus")


def test_a_file_over_the_size_cap_is_skipped_unread(folder):
    (folder / "poetry" / "huge.txt").write_bytes(b"word " * 400)
    names, skipped = read(folder, max_file_bytes=1000)
    assert names == ["poetry/a.txt"]
    assert len(skipped) == 1 and skipped[0].startswith("poetry/huge.txt: ") and "over the limit" in skipped[0]


def test_skip_lines_end_the_table():
    result = {"data": "d", "domains": {"poetry": {"files": 1, "bytes": 36}},
              "models": [{"model": "m", "bpb": 2.0, "per_domain": {"poetry": {"bpb": 2.0}}}],
              "skipped": ["poetry/pipe.txt: not a regular file (a FIFO); not opened"]}
    lines = format_table(result).splitlines()
    assert lines[-2].startswith("overall")
    assert lines[-1] == "skipped poetry/pipe.txt: not a regular file (a FIFO); not opened"
