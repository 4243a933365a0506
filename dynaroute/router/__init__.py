"""Router models, routing policies and calibration."""

# Importing the policy modules registers them in policy.POLICIES.
from dynaroute.router import cascade, threshold, topk  # noqa: F401
