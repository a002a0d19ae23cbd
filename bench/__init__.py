"""Side-by-side CSI benchmarks (not tests): a driver-agnostic load generator and its harness."""
