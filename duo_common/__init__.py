"""Code shared by duo's draft service, verify service and client: the acceptance math, the token tree,
decoding parameters, stopping rules, model loading and the one protobuf codec."""
