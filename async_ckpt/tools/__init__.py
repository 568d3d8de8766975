"""The commands people run on checkpoints: verify, fix (with legacy import), and their reports."""
