"""The Triton side: one aio client per server (gRPC or HTTP), tensor contracts read from Triton,
errors translated into the project's, and the coalescer that batches concurrent calls."""
