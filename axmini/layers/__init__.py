"""Layers, each built from its own config; see each module for one idea."""
