"""Text in, tokens out: the GPT-2 tokenizer, tiny Shakespeare, token shards and `prepare`."""
