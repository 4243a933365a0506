"""dynaroute."""
