"""Device profiles: per-hardware defaults (runtime, threads, input size, frame rate) kept as data."""
