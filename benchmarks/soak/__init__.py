"""The soak: the whole fleet under a steady closed loop for minutes, with recycling, a worker
kill and a canary on the way; every answer checked, every process's memory followed."""
