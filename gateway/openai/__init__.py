"""The OpenAI wire format in one place: request models, chunks, SSE and logprobs."""
