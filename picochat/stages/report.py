"""
Render the run's report card (report/report.md + plots), or reset it at the start of a run.

    picochat report reset       # start a run: clear old sections, record git/hardware/software/cost
    picochat report             # (= generate) render report.md + plots from whatever exists so far

What each stage logs and what the summary table reads: picochat/report.py.
"""
import argparse

from picochat.common import HelpFormatter, get_dist_info
from picochat.report import reset, generate


def main(argv=None):
    p = argparse.ArgumentParser(prog="picochat report", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("action", nargs="?", default="generate", choices=["generate", "reset"],
                   help="generate: render report.md; reset: start a new run's report")
    p.add_argument("--no-copy", action="store_true", help="do not copy report.md into the current directory")
    args = p.parse_args(argv)
    if get_dist_info()[1] != 0:
        return 0
    if args.action == "reset":
        path = reset()
        print(f"report reset; environment written to {path}")
    else:
        path = generate(copy_to_cwd=not args.no_copy)
        print(f"report written to {path}" + ("" if args.no_copy else " (and ./report.md)"))
    return 0
