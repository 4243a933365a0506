"""Examples: a supernet family dynaroute does not ship, trained, evaluated and served (see README.md)."""
