"""Which variant answers: weighted split, sticky keys, pinning, shadow copies and the canary."""
