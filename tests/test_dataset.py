"""dataset.py: listing, split rule, row-group iteration, `text` column checks, --data-dir, download plan."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import dataset, fetch
from picochat.stages import data as data_stage


def _write(path, texts, row_group_size=None, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    # 3 files x 2 row groups of 3 docs; written out of order to check sorting
    for i in (2, 0, 1):
        _write(d / f"shard_{i:05d}.parquet", [f"f{i} d{j}" for j in range(6)], row_group_size=3)
    (d / "shard_00003.parquet.abc.tmp").write_bytes(b"in-flight download")
    (d / "notes.txt").write_text("not data")
    return d


def test_listing_and_split_rule(corpus):
    files = dataset.list_parquet_files(corpus)
    assert [p.name for p in files] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert dataset.split_files("train", corpus) == files[:2]
    assert dataset.split_files("val", corpus) == files[2:]
    with pytest.raises(ValueError, match="split"):
        dataset.split_files("test", corpus)


def test_iter_row_groups_global_stride(corpus):
    groups = list(dataset.iter_row_groups("train", corpus))
    assert groups == [["f0 d0", "f0 d1", "f0 d2"], ["f0 d3", "f0 d4", "f0 d5"],
                      ["f1 d0", "f1 d1", "f1 d2"], ["f1 d3", "f1 d4", "f1 d5"]]
    assert list(dataset.iter_row_groups("train", corpus, start=1, step=2)) == [groups[1], groups[3]]
    assert list(dataset.iter_row_groups("val", corpus)) == [["f2 d0", "f2 d1", "f2 d2"], ["f2 d3", "f2 d4", "f2 d5"]]


def test_default_dir_under_home(picochat_home):
    assert dataset.data_dir() == picochat_home / "data" / "climbmix"
    assert dataset.data_dir("fineweb-edu") == picochat_home / "data" / "fineweb-edu"
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset.data_dir("nope")
    with pytest.raises(FileNotFoundError, match="picochat data download"):
        dataset.list_parquet_files()


def test_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        dataset.list_parquet_files(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.list_parquet_files(tmp_path / "missing")
    one = tmp_path / "one"
    one.mkdir()
    _write(one / "a.parquet", ["x"])
    with pytest.raises(ValueError, match="at least 2"):
        dataset.split_files("train", one)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "a.parquet", ["x"])
    _write(bad / "b.parquet", ["y"], column="content")
    with pytest.raises(ValueError, match=r"b\.parquet has no `text` column"):
        list(dataset.iter_row_groups("val", bad))
    _write(bad / "b.parquet", [1, 2])  # a `text` column of the wrong type
    with pytest.raises(ValueError, match="expected string"):
        dataset.validate_shard(bad / "b.parquet")
    (bad / "c.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"c\.parquet is not a readable parquet"):
        dataset.validate_shard(bad / "c.parquet")
    with pytest.raises(ValueError, match="expected 3"):
        dataset.validate_shard(bad / "a.parquet", expected_bytes=3)


def test_plan_without_mirror(monkeypatch):
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    fetch.set_mirror(None)
    plan = dataset.plan_download(2)
    assert [name for name, *_ in plan] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert plan[2][1] == ("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"
                          "shard_06542.parquet")
    legacy = dataset.plan_download(1, "fineweb-edu")
    assert [name for name, *_ in legacy] == ["shard_00000.parquet", "shard_01822.parquet"]
    assert len(dataset.plan_download(-1, "fineweb-edu")) == 1823


def test_plan_with_shared_mirror_manifest(shared_data, monkeypatch):
    monkeypatch.setenv("PICOCHAT_MIRROR", str(shared_data))
    fetch.set_mirror(None)
    manifest = json.loads((shared_data / "pretrain" / "manifest.json").read_text())
    val = [s["file"] for s in manifest["shards"] if s["split"] == "val"]
    plan = dataset.plan_download(2)
    assert [name for name, *_ in plan] == ["shard_00000.parquet", "shard_00001.parquet"] + val
    assert all(nbytes for _, _, nbytes, _ in plan)  # sizes from the manifest are checked on download


def test_info_cli(corpus, capsys):
    assert data_stage.main(["info", "--data-dir", str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "3 parquet files" in out and "val" in out
