"""Replay the stop rule's window statistic on the committed converged records: at each run's flat stop, would
the window of per-sequence medians (``train.flat_stat: median``) have been flat too? Approximate: a record keeps
each scoring's mean error and the mean rule's improvement interval, not the per-sequence errors, so the median is
taken over the scorings' means and given the mean rule's interval width. Figures quoted in docs/training.md.

    python experiments/flat_replay.py [RECORDS]   # default results/reference/records
"""
import json
import statistics
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "results/reference/records")
stops = moved = 0
for metrics in sorted(root.glob("converged*-runs/*/metrics.json")):
    stop = json.loads(metrics.read_text())["train"].get("stop") or {}
    if stop.get("reason") != "flat":
        continue
    w = yaml.safe_load((metrics.parent / "config.yaml").read_text())["train"]["flat_window"]
    k = [h["step"] for h in stop["heldout"]].index(stop["decay_from"])
    at, errors = stop["heldout"][k], [h["error"] for h in stop["heldout"][k - 2 * w + 1:k + 1]]
    half = (at["improvement"][1] - at["improvement"][0]) / 2
    by_mean = statistics.mean(errors[:w]) - statistics.mean(errors[w:])
    by_median = statistics.median(errors[:w]) - statistics.median(errors[w:])
    stops += 1
    if by_median + half >= at["tolerance"]:
        moved += 1
        print(f"{metrics.parent.name}: flat at {at['step']} by means (gain {by_mean:.5f}), not by medians "
              f"(gain {by_median:.5f}; tolerance {at['tolerance']:.5f})")
print(f"{moved} of {stops} flat stops would not have been flat at that scoring by window medians")
