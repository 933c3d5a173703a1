"""A Jepsen-style fault harness: five real agents, a workload, faults on a seeded schedule, a checker.

Not unit, sim or integration tests of one feature: a tier of its own (docs/nemesis.md).
`history` holds what was observed, `checker` judges it (pure), `cluster` and `faults`
drive the processes and nftables, `workload` makes the calls, `run` ties them together
(`python -m tests.nemesis.run --long --seed 7`).
"""
