"""Rate limits shared by every replica: GCRA quotas and concurrency leases in Redis, or in process.

`gcra` holds the value objects and the arithmetic, `local` and `redis_store` keep the state, `limiter`
chooses between them and applies the failure policy. The pipeline uses only what is exported here.
"""

from sluice.ratelimit.gcra import Lease, Quota, QuotaState, Verdict
from sluice.ratelimit.limiter import LimiterUnavailable, RateLimiter

__all__ = ["Lease", "LimiterUnavailable", "Quota", "QuotaState", "RateLimiter", "Verdict"]
