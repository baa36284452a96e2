"""Build time: archives, their recipes and training, TorchServe's config.properties."""
