"""Inference: the device, tiling, the memory plan, the ensemble, the locator and the engines."""
