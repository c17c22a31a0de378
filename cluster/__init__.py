"""State the gateway's replicas share through Redis (REDIS_URL, issue 14): the link to Redis and its health,
and slot leases. The fair queue they share is the fleet's (fleet.shared_scheduler), built on these."""
