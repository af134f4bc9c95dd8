"""
Pretraining shards: download and inspect.

Examples:
    picochat data download -n 8                 # ClimbMix train shards 0..7 + the validation shard
    picochat data download -n 8 -w 8 --dataset fineweb-edu
    PICOCHAT_MIRROR=/work/shared/data picochat data download -n 2     # from a mirror (pretrain/)
    picochat data download -n -1 --mirror http://127.0.0.1:8000      # everything the mirror has
    picochat data info                          # list shards, splits, rows, row groups, integrity
    picochat data info --deep                   # ... and decode every row group (finds damage no hash covers)
    picochat data info --data-dir /my/parquets  # any directory of parquet files with a `text` column
    picochat data manifest /srv/mirror/pretrain # write a mirror's manifest.json (sizes, SHA-256) for its users
"""
import argparse
from pathlib import Path

from picochat.common import HelpFormatter, atomic_write_text, file_sha256
from picochat import fetch
from picochat.dataset import (DATASETS, DEFAULT_DATASET, get_data_dir, list_parquet_files, row_group_sizes,
                              download_shards, open_parquet, read_row_group, write_manifest)


def _integrity(path, deep: bool) -> str:
    """'sha256 ok' / 'unverified' (no hash known) / 'CORRUPT: why'; deep also decodes every row group."""
    problem = fetch.check_present(path)
    if problem:
        return f"CORRUPT: {problem}"
    if deep:
        pf = open_parquet(path)
        try:
            for rg in range(pf.metadata.num_row_groups):
                read_row_group(pf, rg, path)
        except ValueError as e:
            return f"CORRUPT: {str(e).split('; ')[0]}"
    return "sha256 ok" if fetch.recorded_sha256(path) else ("decodes" if deep else "unverified")


def _info(data_dir_arg, dataset, deep):
    directory = Path(data_dir_arg) if data_dir_arg else get_data_dir(dataset)
    files = list_parquet_files(directory)
    sizes = row_group_sizes(files)
    print(f"{directory}: {len(files)} parquet files")
    corrupt = 0
    for i, (path, rgs) in enumerate(zip(files, sizes)):
        split = "val" if i == len(files) - 1 and len(files) > 1 else "train"
        status = _integrity(path, deep)
        corrupt += status.startswith("CORRUPT")
        print(f"  {path.name:<28} {split:<5} rows {sum(rgs):>9,}  row groups {len(rgs):>4}  {status}")
    if corrupt:
        print(f"error: {corrupt} corrupt shard(s); `picochat data download` replaces them (same -n as before)")
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="picochat data", description="Pretraining shards: download and inspect.", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download train shards 0..N-1 plus the validation shard", formatter_class=HelpFormatter)
    dl.add_argument("-n", "--num-files", type=int, default=-1, help="number of train shards (-1 = all)")
    dl.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    dl.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                    help="which public dataset's shards")
    dl.add_argument("--mirror", default=None, help="http(s) URL or local dir laid out like shared/data "
                                                   "(default: $PICOCHAT_MIRROR, else the public URLs)")
    dl.add_argument("--data-dir", default=None,
                    help="download into this directory (default: $PICOCHAT_HOME/data/<dataset>)")
    dl.add_argument("--retries", type=int, default=5, help='attempts per file before giving up')
    dl.add_argument("--timeout", type=float, default=30.0, help="seconds without data before an attempt fails")
    info = sub.add_parser("info", help="list the shards of a data directory with split, rows and row groups", formatter_class=HelpFormatter)
    info.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET,
                      help="which public dataset's shards")
    info.add_argument("--data-dir", default=None,
                      help="any directory of parquet files with a `text` column (default: the --dataset's download "
                           "directory)")
    info.add_argument("--deep", action="store_true",
                      help="also decode every row group (slow: reads all the data; catches damage without a hash)")
    man = sub.add_parser("manifest", help="write DIR/manifest.json (files, splits, rows, sizes, SHA-256) for a mirror",
                         formatter_class=HelpFormatter)
    man.add_argument("directory", help="a mirror's pretrain/ directory of parquet shards (with --sums: the mirror root)")
    man.add_argument("--sums", action="store_true",
                     help="instead write DIR/SHA256SUMS over every file under the mirror root (tasks, CORE, words...)")
    args = parser.parse_args(argv)

    if args.command == "info":
        return _info(args.data_dir, args.dataset, args.deep)
    if args.command == "manifest" and args.sums:
        root = Path(args.directory)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
        text = "".join(f"{file_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
        atomic_write_text(root / "SHA256SUMS", text)
        print(f"wrote {root / 'SHA256SUMS'}: {len(files)} files")
        return 0
    if args.command == "manifest":
        manifest = write_manifest(args.directory)
        print(f"wrote {Path(args.directory) / 'manifest.json'}: {len(manifest['shards'])} shards with SHA-256")
        return 0
    if args.mirror is not None:
        fetch.set_mirror(args.mirror)
    try:
        paths = download_shards(args.num_files, args.dataset, args.num_workers, args.data_dir,
                                retries=args.retries, timeout=args.timeout)
    except (fetch.DownloadError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(f"Done: {len(paths)} shards in {paths[0].parent if paths else args.data_dir}")
    return 0
