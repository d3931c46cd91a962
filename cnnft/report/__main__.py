"""``python -m cnnft.report RUN_DIR...`` (same as ``cnnft-report``)."""

from cnnft.report.cli import main

main()
