"""KV block events: our tier events out, and a typed decoder of vLLM's event stream in.

Consumer side, transport, parsing and domain kept apart (nothing here imports vLLM):

- `wire`: the publisher's ZMQ frames as `RawMessage(topic, seq, payload)`; replay frames.
- `model`: our domain events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`, `EventBatch`).
- `decoder`: payload -> `EventBatch`, for the map and the older array form, leniently.
- `transport`: the SUB and DEALER sockets, pyzmq's ("zmq") or ours ("zmtp"), behind one interface.
- `zmtp_codec`, `zmtp`: our ZMTP 3.x client (NULL security), every length bounded before buffering.
- `curve`: CURVE keys (authenticated encryption of the streams) and the sockets' options.
- `replay`: `ReplayClient`, a DEALER on a publisher's replay socket.
- `updates`: what a subscriber hands its owner (`ReceivedBatch`, `Reset`, `Gap`).
- `subscriber`: `Subscriber`, one publisher followed in seq order (gaps, restarts, replay).
- `__main__`: `python -m vllm_llmd.events watch ENDPOINT`, the stream printed one event a line.
"""
