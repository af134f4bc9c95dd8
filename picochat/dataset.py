"""
Pretraining shards: where they live, how they are split, how they are read, and how to download them.

A shard is a parquet file with a string column `text` (one document per row), read one row group at a
time. Files are listed sorted; the LAST file is the validation split, all others are train.

The CLI over these (`picochat data download|info`) is picochat/stages/data.py.
"""
import json
import hashlib
from pathlib import Path
from functools import partial
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from picochat import fetch
from picochat.common import get_base_dir, logger, file_sha256, atomic_write_json

DATASETS = {
    # current layout: shard 6542 is always the validation shard (the dataset host's own split)
    "climbmix": {"url": "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                 "max_shard": 6542},
    # the older layout: shard 1822 is the validation shard
    "fineweb-edu": {"url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                    "max_shard": 1822},
}
DEFAULT_DATASET = "climbmix"
MIRROR_DIR = "pretrain"  # shards live under <mirror>/pretrain/, with an optional manifest.json


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir(dataset: str = DEFAULT_DATASET) -> Path:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    return get_base_dir() / "data" / dataset


data_dir = get_data_dir  # the contract's name; functions below take a `data_dir` argument, hence the alias


def _parquets(directory: Path):
    # *.parquet only: in-flight downloads are named shard_NNNNN.parquet.XXXX.tmp and never match
    return sorted(p for p in directory.iterdir() if p.name.endswith(".parquet") and p.is_file())


def list_parquet_files(data_dir=None) -> list:
    """Sorted parquet files of `data_dir` (default: the ClimbMix directory under $PICOCHAT_HOME)."""
    if data_dir is None:
        directory = get_data_dir(DEFAULT_DATASET)
        legacy = get_data_dir("fineweb-edu")
        if not (directory.is_dir() and _parquets(directory)) and legacy.is_dir() and _parquets(legacy):
            logger.warning(f"no ClimbMix shards in {directory}; using the legacy FineWeb-Edu shards in {legacy} "
                           f"(run `picochat data download -n N` to switch to ClimbMix)")
            directory = legacy
    else:
        directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist. Run `picochat data download -n 8` "
                                f"(or pass --data-dir DIR holding parquet files with a `text` column).")
    files = _parquets(directory)
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {directory}. Run `picochat data download -n 8` "
                                f"(or pass --data-dir DIR holding parquet files with a `text` column).")
    return files


def split_files(split: str, data_dir=None) -> list:
    """train = every file but the last, val = the last file, all = every file (evaluating a directory that is not a
    train/val pair, even a single file)."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    files = list_parquet_files(data_dir)
    if split == "all":
        return files
    if len(files) < 2:
        raise ValueError(f"only {len(files)} parquet file in {files[0].parent}: need at least 2, because the last "
                         f"file is the validation split and the rest are train. Download more shards "
                         f"(`picochat data download -n 2`) or add a second file.")
    return files[:-1] if split == "train" else files[-1:]


def check_text_column(pf: pq.ParquetFile, path) -> None:
    """Raise a clear error unless the parquet file has a string column named `text`."""
    schema = pf.schema_arrow
    idx = schema.get_field_index("text")
    if idx < 0:
        raise ValueError(f"{path} has no `text` column (columns: {schema.names}); picochat reads documents "
                         f"from a string column named `text`.")
    typ = schema.field(idx).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise ValueError(f"{path}: column `text` has type {typ}, expected string.")


def validate_shard(path, expected_bytes=None) -> None:
    """Cheap integrity check (footer + schema, no data read): a readable parquet file with a string `text`
    column, and the expected size when a manifest told us one."""
    path = Path(path)
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {expected_bytes}")
    open_parquet(path)


def open_parquet(path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}); delete it and download it again") from e
    check_text_column(pf, path)
    return pf


def row_group_sizes(files) -> list:
    """Per file, the number of documents in each row group: [[rows_rg0, rows_rg1, ...], ...]."""
    sizes = []
    for path in files:
        md = open_parquet(path).metadata
        sizes.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
    return sizes


def read_row_group(pf: pq.ParquetFile, rg: int, path=None) -> list:
    """The texts of one row group; a damaged file is an error naming it and the fix (pyarrow's own message,
    e.g. "ZSTD decompression failed", names no file)."""
    try:
        texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path or 'a parquet file'}: row group {rg} cannot be read ({e}); the file is corrupt. Delete it and run "
                         f"`picochat data download` again (it re-fetches missing and corrupt shards)") from e
    return [t if t is not None else "" for t in texts]


def data_fingerprint(files) -> str:
    """SHA-256 over the files' names and contents (each content hash from its download record when one exists):
    what an evaluation on "another data directory" was measured on."""
    h = hashlib.sha256()
    for path in files:
        path = Path(path)
        h.update(path.name.encode() + b"\0" + (fetch.recorded_sha256(path) or file_sha256(path)).encode() + b"\n")
    return h.hexdigest()


def write_manifest(directory) -> dict:
    """Describe a mirror's shard directory (every *.parquet; the last one is the validation split) in the manifest
    format plan_download reads, SHA-256 included; written atomically to <directory>/manifest.json."""
    directory = Path(directory)
    files = list_parquet_files(directory)
    shards = []
    for i, path in enumerate(files):
        md = open_parquet(path).metadata
        shards.append({"file": path.name, "split": "val" if i == len(files) - 1 else "train", "rows": md.num_rows,
                       "file_bytes": path.stat().st_size, "sha256": file_sha256(path)})
    manifest = {"shards": shards}
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


def iter_row_groups(split: str, data_dir=None, start=0, step=1):
    """Yield the texts (list[str]) of every `step`-th row group from `start`, counting row groups globally
    across the split's files in order (file 0's row groups, then file 1's, ...). One pass, not infinite."""
    k = 0
    for path in split_files(split, data_dir):
        pf = open_parquet(path)
        for rg in range(pf.metadata.num_row_groups):
            if k >= start and (k - start) % step == 0:
                yield read_row_group(pf, rg, path)
            k += 1

# -----------------------------------------------------------------------------
# Download


def _mirror_manifest():
    """The mirror's pretrain/manifest.json as a dict, or None (no mirror, or the mirror has none)."""
    if fetch.get_mirror() is None:
        return None
    text = fetch.fetch_text(f"{MIRROR_DIR}/manifest.json")
    if text is None:
        return None
    try:
        manifest = json.loads(text)
        shards = manifest["shards"]
        assert all("file" in s and "split" in s for s in shards)
        return manifest
    except Exception as e:
        raise ValueError(f"the mirror's {MIRROR_DIR}/manifest.json is malformed ({e}); expected "
                         f'{{"shards": [{{"file": ..., "split": "train"|"val", "file_bytes": ..., "sha256": ...}}, '
                         f'...]}} (`picochat data manifest DIR` writes one)') from e


def plan_download(num_files: int, dataset: str = DEFAULT_DATASET):
    """-> list of (file name, public URL, expected bytes or None, SHA-256 or None): train shards 0..N-1 (all when
    N < 0) plus the validation shard. With a mirror manifest, only shards the mirror has are planned, with the
    manifest's sizes and hashes; from the public host the hub publishes each shard's SHA-256 itself."""
    info = DATASETS[dataset]
    manifest = _mirror_manifest()
    if manifest is not None:
        train = sorted((s for s in manifest["shards"] if s["split"] == "train"), key=lambda s: s["file"])
        val = [s for s in manifest["shards"] if s["split"] == "val"]
        if len(val) != 1:
            raise ValueError(f"the mirror's manifest lists {len(val)} validation shards; expected exactly 1")
        if train and val[0]["file"] < train[-1]["file"]:
            logger.warning(f"the mirror's validation shard {val[0]['file']} does not sort last; locally the last "
                           f"file is treated as validation, so splits may differ from the mirror's")
        if num_files > len(train):
            logger.warning(f"asked for {num_files} train shards but the mirror {fetch.get_mirror()} has only "
                           f"{len(train)}; downloading those {len(train)} (+ the validation shard)")
        chosen = train if num_files < 0 else train[:num_files]
        return [(s["file"], f"{info['url']}/{s['file']}", s.get("file_bytes"), s.get("sha256")) for s in chosen + val]
    n = info["max_shard"] if num_files < 0 else min(num_files, info["max_shard"])
    if num_files > info["max_shard"]:
        logger.warning(f"{dataset} has only {info['max_shard']} train shards; downloading all of them")
    indices = list(range(n)) + [info["max_shard"]]
    return [(shard_name(i), f"{info['url']}/{shard_name(i)}", None, None) for i in indices]


def download_shards(num_files: int, dataset: str = DEFAULT_DATASET, num_workers: int = 4, dest_dir=None,
                    retries=5, timeout=30) -> list:
    """Download (in parallel threads) what plan_download says into dest_dir (default data/<dataset>).
    Returns the paths; raises DownloadError listing every shard that failed (the others stay valid)."""
    dest_dir = Path(dest_dir) if dest_dir is not None else get_data_dir(dataset)
    dest_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_download(num_files, dataset)
    source = fetch.get_mirror() or DATASETS[dataset]["url"]
    print(f"Downloading {len(plan)} shards of {dataset} from {source} into {dest_dir} with {num_workers} workers")

    def one(name, url, nbytes, sha256):
        return fetch.download(f"{MIRROR_DIR}/{name}", url, dest_dir / name, sha256=sha256,
                              validate=partial(validate_shard, expected_bytes=nbytes),
                              retries=retries, timeout=timeout, progress=False)

    paths, errors = [], []
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, \
            tqdm(total=len(plan), unit="shard", disable=not fetch._show_progress(True)) as bar:
        futures = {pool.submit(one, *item): item[0] for item in plan}
        for fut in as_completed(futures):
            try:
                paths.append(fut.result())
                tqdm.write(f"Downloaded {len(paths)}/{len(plan)}: {futures[fut]}")
            except Exception as e:
                errors.append(f"{futures[fut]}: {e}")
            bar.update(1)
    if errors:
        raise fetch.DownloadError(f"{len(errors)} of {len(plan)} shards failed (the {len(paths)} others are in "
                                  f"{dest_dir}; rerun to retry only the missing ones):\n  " + "\n  ".join(errors))
    return sorted(paths)
