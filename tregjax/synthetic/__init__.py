"""The embedded default world (configs/demo.py): a synthetic task where token-level credit assignment is measurable."""
