"""Training: the model, attention masks, the DeepSpeed engine, the trainer and its parts (guards, schedule,
checkpointing policy), the micro-batch probe and exact-match scoring."""
