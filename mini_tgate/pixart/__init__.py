"""PixArt-Alpha and -Sigma: T5 text encoder and tokenizer, the transformer, the pipelines."""
