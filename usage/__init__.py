"""Who used how much: one usage record per admitted model call, the quotas built on them, and the reports."""
