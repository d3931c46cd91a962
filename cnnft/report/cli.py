"""``cnnft-report RUN_DIR...``: rebuild the report from existing run directories, rerunning nothing.

A RUN_DIR is a ``cnnft-reproduce`` root, a run/analysis directory with ``results/`` (prefix
``NAME=`` to say which network it is: ``pretrained``, ``finetune_all``, ``finetune_fc``,
``fifty_fifty``, ``random``), a directory of snapshot analyses, or a sweep of those.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cnnft.errors import CnnftError
from cnnft.report.build import build_report
from cnnft.report.load import split_spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cnnft-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="[NAME=]directory to read")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="where to write the report (default: <first RUN_DIR>/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables to a W&B run (offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or split_spec(args.runs[0])[1] / "report"
    try:
        md = build_report(args.runs, out, wandb=args.wandb)
    except CnnftError as e:
        parser.exit(2, f"cnnft-report: error: {e}\n")
    print(f"{md}\n{md.with_suffix('.html')}")


if __name__ == "__main__":
    main()
