"""Describing a change in words a user can act on (pure): what differs between the config a
run directory holds and the one given now (each key with both values), and what an input
that changed since it was listed means for the run."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple


# identity paths -> the config key a user writes (the rest are the same dotted path)
_IDENTITY_KEYS = {"blobs": "output.blobs", "input": "input", "model.prototxt_sha256": "model.prototxt (sha256)",
                  "model.weights_sha256": "model.weights (sha256)",
                  "model.mean_file_sha256": "model.preprocess.mean_file (sha256)"}


def _flat(d, prefix: str = "") -> Dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, object] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _shown(v, key: str) -> str:
    if v is None:
        return "null"
    if isinstance(v, str) and key.endswith("sha256") and len(v) > 12:
        return v[:12] + "..."
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v).lower() if isinstance(v, bool) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def identity_changes(old: Dict, new: Dict, limit: int = 3) -> List[str]:
    """'key: old -> new' for what differs between two identities (pure), the config key named
    as a user writes it; at most `limit`, then '... and N more'."""
    a, b = _flat(old), _flat(new)
    changes = []
    for k in list(b) + [k for k in a if k not in b]:
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            changes.append(f"{_IDENTITY_KEYS.get(k, k)}: {_shown(a.get(k), k)} -> {_shown(b.get(k), k)}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"and {len(changes) - limit} more"]
    return changes or ["its recorded config"]


def stamp_changed(old: Dict, new: Dict) -> bool:
    """Whether the input differs from what the run listed (pure). A folder's stamp names its
    images (a digest), so folders' own mtimes need not count: a run folder made inside the
    input changes its parent's mtime, not the input. A stamp recorded before names were
    stamped ({count, mtime_ns} with folders' mtimes in it, so never older than its newest
    image) compares by count and by no image newer than it."""
    if "count" in old and "names" not in old and "names" in new:
        return old["count"] != new["count"] or new["mtime_ns"] > old["mtime_ns"]
    return old != new


def describe_change(old: Optional[Dict], new: Optional[Dict]) -> str:
    """What changed between two input stamps, in words."""
    if old and new and "count" in old and "count" in new and old["count"] != new["count"]:
        return f"{old['count']} images when listed, {new['count']} now"
    if old and new and "size" in old and old.get("size") != new.get("size"):
        return f"the list file was {old['size']} bytes when listed, {new['size']} now"
    return "files were added, replaced or modified since it was listed"


def input_change_advice(old: Optional[Dict], new: Optional[Dict]) -> Tuple[bool, str]:
    """(whether the run misses images, what to do) for an input whose stamp changed (pure).
    Fewer images: the run still covers every image the input holds (their rows are kept);
    more, or the same number changed: new or renamed images are not in the run
    (input.relist=true adds them); rewritten files are only re-extracted in a new output.dir."""
    if old and new and "count" in old and "count" in new and new["count"] < old["count"]:
        return False, (f"{old['count'] - new['count']} listed image(s) are gone from the input (deleted since?): "
                       "the run keeps what it extracted from them and holds every image still there; for a run "
                       "of the input as it is now, use a new output.dir")
    return True, ("input.relist=true adds new (and renamed) images as new shards; rewritten images are "
                  "extracted again only in a new output.dir")
