"""State the gateway's replicas share through Redis (REDIS_URL, issue 14): the link to Redis and its health,
slot leases, and the fair queue (cluster.shared_scheduler)."""
