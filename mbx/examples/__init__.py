"""Built-in examples: the example capture and example NFs."""
