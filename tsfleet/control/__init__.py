"""Runtime control of one box: the management and router-admin clients, apply, swaps, rollouts,
worker recycling, bringing the fleet up and its status."""
