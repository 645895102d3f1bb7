"""Image datasets: loaders, client partitioning and per-client storage."""
