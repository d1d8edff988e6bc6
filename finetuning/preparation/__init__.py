"""Preparation: speaker sources -> quality gate -> 24 kHz audio + precomputed codes -> a config per speaker."""
