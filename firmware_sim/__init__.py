"""Emulated OVMS v3 modules, owner app and partner listener for ChargeShare."""
