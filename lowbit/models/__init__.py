"""Models: resolve a name or path, load it as float32 transformers model + tokenizer + spec."""
