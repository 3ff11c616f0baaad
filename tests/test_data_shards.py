"""Plain shard reading and the DALI index agree on what the samples are."""
from __future__ import annotations

import io
import tarfile

from imagebert_ds.data.shards import iter_samples, read_index, write_index


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_hidden_files_and_dirs_skipped_like_the_index(tmp_path):
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        _add(tf, "000001.txt", b"a cat")
        _add(tf, "000001.json", b"{}")
        _add(tf, "._000001.txt", b"macOS resource fork")  # AppleDouble: not a sample
        _add(tf, "sub/.hidden.txt")
        _add(tf, "000002.txt", b"a dog")
    write_index(tar, tmp_path / "s.idx")
    indexed = [(e.key, sorted(e.components)) for e in read_index(tmp_path / "s.idx")]
    plain = [(k, sorted(c)) for k, c in iter_samples(tar)]
    assert plain == indexed == [("000001", ["json", "txt"]), ("000002", ["txt"])]
    assert dict(iter_samples(tar))["000001"]["txt"] == b"a cat"
