"""Loader, (later) paged KV cache, scheduler, sampler, runner and the LLM API."""
