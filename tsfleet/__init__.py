"""tsfleet: build, package and check a fleet of TorchServe models."""
