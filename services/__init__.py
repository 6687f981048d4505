"""disagg services: gateway, scheduler, prefill and decode workers, and the `disagg` CLI."""
