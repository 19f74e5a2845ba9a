"""Triton kernels for ReSAM-dist (imported as `resam_kernels`)."""
