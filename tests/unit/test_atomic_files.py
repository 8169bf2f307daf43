"""A write that fails part-way (a crash, a full disk) leaves the previous file whole: resume and the sweep
collector read these files without any other check."""

from __future__ import annotations

import pytest

from engram_train.atomic_files import atomic_copy, atomic_write, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_a_finished_one_replaces_it(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, '{"final_val_loss": 4.0}\n')

    def dies_half_way(f):
        f.write(b'{"final_val')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, dies_half_way)
    assert target.read_text() == '{"final_val_loss": 4.0}\n'

    source = tmp_path / "tokenizer.json"
    source.write_bytes(b"x" * (3 << 20))
    atomic_copy(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "tokenizer.json"], "no temporary file left"
