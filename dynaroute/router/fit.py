"""Placeholder until the router lands: no router, no calibration."""

from __future__ import annotations


def fit_router_and_calibrate(model, splits, probs, labels, subnets, out, progress=True) -> dict:
    return {}
