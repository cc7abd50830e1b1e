"""Calibration of dynamic early exit: Learn-then-Test statistics and the threshold walk."""
