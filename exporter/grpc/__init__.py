"""The gRPC Observer: the flow stream every agent serves and the relay that merges them."""
