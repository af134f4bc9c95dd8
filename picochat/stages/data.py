"""
Pretraining shards: download and inspect.

Examples:
    picochat data download -n 8                 # ClimbMix train shards 0..7 + the validation shard
    picochat data download -n 8 -w 8 --dataset fineweb-edu
    PICOCHAT_MIRROR=/work/shared/data picochat data download -n 2     # from a mirror (pretrain/)
    picochat data download -n -1 --mirror http://127.0.0.1:8000      # everything the mirror has
    picochat data info                          # list shards, splits, rows, row groups
    picochat data info --data-dir /my/parquets  # any directory of parquet files with a `text` column
"""
import argparse
from pathlib import Path

from picochat.common import HelpFormatter
from picochat import fetch
from picochat.dataset import (DATASETS, DEFAULT_DATASET, get_data_dir, list_parquet_files, row_group_sizes,
                              download_shards)


def _info(data_dir_arg, dataset):
    directory = Path(data_dir_arg) if data_dir_arg else get_data_dir(dataset)
    files = list_parquet_files(directory)
    sizes = row_group_sizes(files)
    print(f"{directory}: {len(files)} parquet files")
    for i, (path, rgs) in enumerate(zip(files, sizes)):
        split = "val" if i == len(files) - 1 and len(files) > 1 else "train"
        print(f"  {path.name:<28} {split:<5} rows {sum(rgs):>9,}  row groups {len(rgs):>4}")
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
    args = parser.parse_args(argv)

    if args.command == "info":
        return _info(args.data_dir, args.dataset)
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
