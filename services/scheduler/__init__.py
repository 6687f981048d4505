"""Scheduler: worker table from heartbeats, placement, P:D rate matching."""
