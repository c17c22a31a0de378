"""The link the gateway's replicas share state through (REDIS_URL, issue 14): the Redis client and its
health. What they share is built on it by its owners: the fair queue and the hosts (fleet.shared_scheduler,
fleet.shared_hosts) and the quota ledgers (usage.shared_quotas)."""
