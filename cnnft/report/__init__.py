"""The reproduction report: the paper's tables and figures beside our numbers.

``build_report(run_dirs, out)`` loads results (a ``cnnft-reproduce`` root or any run
directories) and writes ``report.md``, a self-contained ``report.html``, ``tables/*.csv`` and
``figures/*.png`` (and a W&B run with the tables when asked). ``cnnft-report RUN_DIR...``
does the same from the command line, rerunning nothing.
"""

from cnnft.report.build import build_report

__all__ = ["build_report"]
