"""Speed benchmarks, each side by side with a peer (``make bench`` runs every ``bench_*.py``)."""
