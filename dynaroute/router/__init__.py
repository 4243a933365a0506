"""Router models, routing policies and calibration."""
