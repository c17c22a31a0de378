"""The audit trail: every admin action that succeeded (people, roles, allow-lists, caps, keys, hosts, models),
who took it, when and from where, kept in the database and read at `GET /admin/audit`."""
