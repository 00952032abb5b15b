"""gRPC at the edge: servicers over the store, channel settings, and the error-to-status table."""
