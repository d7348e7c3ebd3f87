"""Logging setup for confide's processes.

Log lines carry allow-listed fields only (outcomes, sizes after padding,
durations, counts); no module logs content, keys, reply tokens or addresses.
"""

import logging
import sys


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs at INFO and below with connection details; keep warnings only.
    logging.getLogger("nats").setLevel(logging.WARNING)
