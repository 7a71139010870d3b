"""The serving core's plain-Python half: requests, the page pool, the continuous-batching
scheduler and the step plans it sends to workers. No torch or ray imports here."""
