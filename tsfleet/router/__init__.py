"""The A/B router: a gateway in front of TorchServe's inference APIs (REST and gRPC) that
splits traffic between versions, keeps users sticky, mirrors to a shadow, rolls back a bad
candidate by itself, and retries a request a dying worker dropped."""
