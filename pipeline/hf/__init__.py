"""The HF transformers format, both directions: the Llama state-dict adapter and the tokenizer files."""
