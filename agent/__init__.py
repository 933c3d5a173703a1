"""The per-host gpu-agent process: trio shells around the coordinator cores."""
