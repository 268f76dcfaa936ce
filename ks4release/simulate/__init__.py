"""Simulated KS4 survey with known truth: the embedded demo of ``ks4release build dr1``."""
