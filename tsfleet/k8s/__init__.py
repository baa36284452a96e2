"""The fleet on Kubernetes: kubectl, rollouts across pods, the TorchServe container's entry point."""
