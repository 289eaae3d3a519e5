"""Calibration: capture the inputs of linears with hooks and reduce them to streaming statistics."""
