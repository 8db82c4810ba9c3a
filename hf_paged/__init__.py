"""hf_paged: PagedAttention and continuous batching for Hugging Face models."""
