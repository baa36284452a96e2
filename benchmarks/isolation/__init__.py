"""Batch isolation under hostile clients: one client's bad body never fails a batch-mate."""
