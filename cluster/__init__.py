"""State the gateway's replicas share through Redis (REDIS_URL, issue 14): the link to Redis and its health,
and slot leases."""
