"""What the gateway reports: Prometheus metrics, FLOP model, device peak and MFU, memory, cost."""
