"""TorchServe handlers and the small model code they load (torch, Pillow and stdlib only)."""
