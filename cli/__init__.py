"""The `disagg` command line and the tools around the services: `up` (the stack as child
processes), `procs` (child processes by PID), `local` (tiny-model, generate), `tiny` (tiny
random checkpoints)."""
