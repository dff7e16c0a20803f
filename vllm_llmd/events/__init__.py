"""KV block events: our tier events out, and a typed decoder of vLLM's event stream in."""
