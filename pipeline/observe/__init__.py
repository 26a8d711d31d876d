"""What a person reads: the console, metrics.jsonl and the run report."""
