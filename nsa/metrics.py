"""RUN_DIR/metrics.jsonl: the run's log, one JSON object per line, each with its "step".

A process killed mid-write leaves a partial last line; readers skip lines that are not JSON objects
(and say how many) instead of failing on them."""

import json
from pathlib import Path


def read_records(path):
    """-> (records, number of unreadable lines skipped)."""
    records, bad = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            bad += 1
    return records, bad


def keep_until(path, step):
    """Rewrite the log keeping the readable records up to `step` (a resumed run logs the later ones
    again); a missing log starts empty. Returns the records kept and the unreadable lines dropped."""
    path = Path(path)
    records, bad = read_records(path) if path.exists() else ([], 0)
    records = [r for r in records if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, bad


def append(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
