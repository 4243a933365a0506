"""Training: supernets, routers, evaluation and the accuracy-compute report."""
