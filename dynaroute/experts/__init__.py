"""Supernets, sub-network extraction, FLOP counting and the expert Ray actor."""

from dynaroute.experts.base import DynamicModel, StagedModule
from dynaroute.experts.mlp import MLPConfig, SlimmableMLP
from dynaroute.experts.spec import SubnetSpec

__all__ = ["DynamicModel", "MLPConfig", "SlimmableMLP", "StagedModule", "SubnetSpec"]
