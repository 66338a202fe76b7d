"""The LLM half: loading a Llama-family classifier, its LoRA adapters, training it and the forward passes that give
the head's probabilities and the pooled vectors the feature table stores."""
