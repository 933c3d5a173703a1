"""Pure, deterministic cluster logic for gpu-orchestrator.

Nothing in this package opens a socket, reads a clock, touches NVML or imports
trio: every function takes the current time (`now`, seconds since the Unix
epoch) and any randomness (`random.Random`) as arguments, so a seed and a list
of inputs reproduce any run exactly. The agent package wraps these cores in I/O.
"""
