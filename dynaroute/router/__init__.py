"""Router models, routing policies and calibration."""

# Importing the policy modules registers them in policy.POLICIES.
from dynaroute.router import cascade, static, threshold, topk  # noqa: F401
