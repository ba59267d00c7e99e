"""Benchmarks of the ChargeShare service against raw baselines (`python -m bench`)."""
