"""The files in which prometheus-client's multiprocess mode keeps each worker's metrics.

Apart from metrics.py so that the command can empty the directory before anything imports
prometheus-client's metrics: with one worker, the app runs in the command's own process, and
its metrics' files are made as metrics.py is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

# How prometheus-client names a worker's files: its kind (a gauge's with its mode) and its pid.
_WORKER_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_[0-9]+\.db")


def worker_files(directory: str) -> list[Path]:
    """The workers' metrics files in `directory`, and no other file: an operator's directory may
    hold other .db files (the gateway's own database, say), which are neither read nor removed."""
    return [path for path in Path(directory).glob("*.db") if _WORKER_FILE.fullmatch(path.name)]
