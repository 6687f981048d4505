"""`disagg planner`: desired prefill and decode worker counts from measured load and SLOs."""
