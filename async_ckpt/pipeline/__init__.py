"""The save and restore pipeline: plan → snapshot (host staging, CUDA copies, device
checksums) → per-rank write → coordinator commit; and restore into live objects.
"""
