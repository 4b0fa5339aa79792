"""``python peak_rss.py SCRIPT ARGS...``: run ``python SCRIPT ARGS...`` as a child and print, as
the last line of stdout, JSON ``{"returncode", "peak_rss_mb"}``: the largest resident set of
the child and of every process it waited for (its workers), from ``getrusage(RUSAGE_CHILDREN)``."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

if __name__ == "__main__":
    result = subprocess.run([sys.executable, *sys.argv[1:]])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    print(json.dumps({"returncode": result.returncode, "peak_rss_mb": peak_kb / 1024}))
