"""Text to batches: corpus reading, the built-in corpus, vocabulary and chat template, MMIDIDX shards,
shard sources, batch layout, the token stream, mixtures and SFT examples."""
