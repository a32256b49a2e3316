"""Inference: load a trained model once; generate, validate, package, export, evaluate."""
