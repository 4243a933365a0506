"""The gRPC gateway: servicers, batching, dispatch to Ray experts, aggregation."""
