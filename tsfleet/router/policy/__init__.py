"""What the router decides, with no I/O: which version answers, when to retry, what to record
and mirror, and the routes read from the fleet."""
