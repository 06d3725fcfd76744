"""Row 11: decode.reduced_jpeg's features against full decoding: fc7 cosines on the camera
photos, and of both against an anti-aliased reference (full decode + area resize). Runs in the
rounds of extract.py (not with --only limits).
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np


def reduced_agreement(paths: List[str], proto: str, weights: str) -> Dict:
    """fc7 of each camera photo three ways: full decode + bilinear resize (the default), reduced
    JPEG decoding, and full decode + area resize (an anti-aliased reference neither of the others
    uses). Cosines against the default, and of each against the reference."""
    import cv2

    from runner.engine.decode import Decoder, Geometry
    from runner.engine.model import CaffeEngine, parse_prototxt

    class M:
        pass

    m = M()
    m.weights = weights
    eng = CaffeEngine(m, parse_prototxt(proto), ["fc7"], (3, 300, 300))
    mean = np.array([104.0, 177.0, 123.0], np.float32)[:, None, None]

    def feats(dec):
        out = []
        for p in paths:
            img, why = dec.load(os.fsencode(p))
            assert why is None, why
            x = img.astype(np.float32).transpose(2, 0, 1)[None] - mean
            out.append(eng.forward(x)["fc7"].ravel().astype(np.float64))
        return np.array(out)

    full = feats(Decoder(Geometry((300, 300))))
    reduced = feats(Decoder(Geometry((300, 300)), reduced_jpeg=True))
    ref = feats(Decoder(Geometry((300, 300), interpolation="area")))

    def cos(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    c_rf, c_fref, c_rref = cos(reduced, full), cos(full, ref), cos(reduced, ref)
    del cv2
    return {"images": len(paths), "reduced_vs_full_worst": float(c_rf.min()),
            "reduced_vs_full_median": float(np.median(c_rf)),
            "full_vs_area_reference_worst": float(c_fref.min()), "full_vs_area_reference_median": float(np.median(c_fref)),
            "reduced_vs_area_reference_worst": float(c_rref.min()),
            "reduced_vs_area_reference_median": float(np.median(c_rref))}
