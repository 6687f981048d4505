"""disagg bench: load generator, side-by-side mode comparison, plots."""
