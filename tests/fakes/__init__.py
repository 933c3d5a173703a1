"""Test doubles: stand-ins for what the agent talks to (NVML) that tests can script."""
