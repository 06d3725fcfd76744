"""Open a report in real headless Chromium (network off) and check what a person would see:
no console errors, no request but the file itself, and the charts drawn (their marks present in
the DOM with a non-empty size, and coloured pixels where the chart is)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict

import pytest

from browser import Browser, chromium_path

# a chart's marks: vector paths with the ids report.py gives them, or (many shards) the image
# matplotlib rasterizes them into inside the SVG
CHARTS = {"timeline": "#timeline-bars path, svg image",
          "rate": "[id^=rate-] path, svg image",
          "shard-rate": "[id^=shard-rate-] path, svg image"}

MEASURE = """(() => {
  const out = {};
  for (const [id, marks] of Object.entries(%s)) {
    const fig = document.getElementById(id);
    if (!fig) { out[id] = null; continue; }
    const r = fig.querySelector('svg').getBoundingClientRect();
    const els = [...fig.querySelectorAll(marks)];
    const drawn = els.filter(e => { const b = e.getBoundingClientRect(); return b.width > 0 || b.height > 0; });
    out[id] = {x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height,
               marks: els.length, drawn: drawn.length};
  }
  out.state = (document.getElementById('run-state') || {}).textContent;
  out.text = document.body.innerText;
  return out;
})()"""


def need_chromium():
    if not chromium_path():
        pytest.skip("needs chromium (make test installs it: apt-get install -y chromium)")


def coloured_share(png: bytes) -> float:
    """Share of pixels that are neither white nor grey (chart marks, not axes or text)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    spread = a.max(axis=2) - a.min(axis=2)
    return float((spread > 40).mean())


def check_report(path: Path, screenshot: Path = None) -> Dict:
    need_chromium()
    import json

    with Browser() as b:
        b.open(path)
        seen = b.evaluate(MEASURE % json.dumps(CHARTS))
        assert b.problems() == [], b.problems()
        # the page itself, and images inlined as data: URIs; nothing from anywhere else
        fetched = [u for u in b.requests() if not u.startswith("data:")]
        assert fetched == [Path(path).resolve().as_uri()], fetched
        for chart in CHARTS:
            m = seen[chart]
            assert m is not None, f"{chart}: no such figure in the report"
            assert m["width"] > 200 and m["height"] > 80, (chart, m)
            assert m["drawn"] >= 1, (chart, m)
            png = b.screenshot(clip={"x": m["x"], "y": m["y"], "width": m["width"], "height": m["height"]})
            share = coloured_share(png)
            assert share > 0.01, f"{chart}: only {share:.4f} of its pixels are coloured: nothing drawn?"
            seen[chart]["coloured_share"] = share
        if screenshot is not None:
            Path(screenshot).write_bytes(b.screenshot(full_page=True))
    return seen
