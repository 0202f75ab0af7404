"""Training: corpus, tokenizer, and the recipe that made the shipped reference model."""
