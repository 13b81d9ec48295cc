"""Rate-limit state in Redis, shared by every replica: one Lua script call (EVALSHA) per admission or settlement.

The scripts read the time from Redis (`TIME`), so all replicas share one clock, and repeat `gcra`'s
formulas operation for operation (doubles on both sides, passed as exact 17-digit strings), so the verdict
built here from the script's reply is the one the script committed. Times are seconds since EPOCH rather
than 1970, which keeps 16 times more float precision. Idle state expires: a TAT key lives until its bucket
is full again, a lease set until its last lease expires. Every key of one call is touched by one script,
so on Redis Cluster they would need one hash slot (not supported: one Redis, or one primary with replicas).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sluice.ratelimit.gcra import EPSILON, Lease, Quota, Verdict, decide
from sluice.resp import RespClient, RespError

EPOCH = 1_700_000_000  # 2023-11-14; changing it strands the stored TATs, which only live as long as a window

_COMMON = f"""
local function now_seconds()
  local time = redis.call('TIME')
  return (tonumber(time[1]) - {EPOCH}) + tonumber(time[2]) / 1000000
end

local function exact(number)
  return string.format('%.17g', number)
end

local function keep(key, tat, now)
  local ttl = math.ceil((tat - now) * 1000)
  if ttl > 0 then
    redis.call('SET', key, exact(tat), 'PX', ttl)
  else
    redis.call('DEL', key)  -- a full bucket needs no state
  end
end
"""

# KEYS: one per quota, then the lease set if any. ARGV: n, (rate, burst, cost) per quota, then
# (limit, lease id, ttl) if a lease. Reply: {allowed, now, lease free, TAT before of each quota}.
ADMIT = (
    _COMMON
    + f"""
local n = tonumber(ARGV[1])
local now = now_seconds()
local reply = {{0, exact(now), 1}}
local after = {{}}
local allowed = true
for i = 1, n do
  local rate, burst, cost = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  reply[3 + i] = exact(tat)
  after[i] = math.max(tat, now) + cost / rate
  if cost > burst or after[i] - now - burst / rate > {EPSILON!r} then
    allowed = false
  end
end
local leases = KEYS[n + 1]
if leases then
  local limit, id, ttl = tonumber(ARGV[3 * n + 2]), ARGV[3 * n + 3], tonumber(ARGV[3 * n + 4])
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', exact(now))
  if not redis.call('ZSCORE', leases, id) and redis.call('ZCARD', leases) >= limit then
    reply[3] = 0
    allowed = false
  elseif allowed then
    redis.call('ZADD', leases, exact(now + ttl), id)
    local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
    redis.call('PEXPIRE', leases, math.ceil((tonumber(last[2]) - now) * 1000))
  end
end
if allowed then
  for i = 1, n do
    keep(KEYS[i], after[i], now)
  end
  reply[1] = 1
end
return reply
"""
)

# KEYS: one per quota, then the lease set if any. ARGV: n, (rate, change) per quota, then the lease id.
SETTLE = (
    _COMMON
    + """
local n = tonumber(ARGV[1])
local now = now_seconds()
for i = 1, n do
  local rate, delta = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  keep(KEYS[i], math.max(now, math.max(tat, now) + delta / rate), now)
end
if KEYS[n + 1] then
  redis.call('ZREM', KEYS[n + 1], ARGV[2 * n + 2])
end
return 1
"""
)


class RedisStore:
    __slots__ = ("_admit", "_prefix", "_settle", "client")

    def __init__(self, client: RespClient, key_prefix: str) -> None:
        self.client = client
        self._prefix = key_prefix
        self._admit = ""  # the scripts' SHA1s, once loaded
        self._settle = ""

    async def load(self) -> None:
        """Load both scripts now, so the first requests do not pay for NOSCRIPT (also checks Redis answers)."""
        self._admit = (await self.client.call("SCRIPT", "LOAD", ADMIT)).decode()
        self._settle = (await self.client.call("SCRIPT", "LOAD", SETTLE)).decode()

    async def _run(self, script: str, keys: list[str], args: list[float | int | str]) -> Any:
        sha = self._admit if script is ADMIT else self._settle
        try:
            return await self.client.call("EVALSHA", sha, len(keys), *keys, *args)
        except RespError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        await self.load()  # Redis restarted or flushed its script cache
        sha = self._admit if script is ADMIT else self._settle
        return await self.client.call("EVALSHA", sha, len(keys), *keys, *args)

    async def admit(self, quotas: Sequence[Quota], lease: Lease | None) -> Verdict:
        prefix = self._prefix
        keys = [prefix + quota.key for quota in quotas]
        args: list[float | int | str] = [len(quotas)]
        for quota in quotas:
            args += (quota.rate, quota.burst, quota.cost)
        if lease is not None:
            keys.append(prefix + lease.key)
            args += (lease.limit, lease.lease_id, lease.ttl)
        reply = await self._run(ADMIT, keys, args)
        tats = [float(tat) for tat in reply[3:]]
        verdict, _ = decide(float(reply[1]), quotas, tats, lease, reply[2] == 1, False)
        return verdict

    async def settle(self, changes: Sequence[tuple[Quota, float]], lease: Lease | None) -> None:
        prefix = self._prefix
        keys = [prefix + quota.key for quota, _ in changes]
        args: list[float | int | str] = [len(changes)]
        for quota, delta in changes:
            args += (quota.rate, delta)
        if lease is not None:
            keys.append(prefix + lease.key)
            args.append(lease.lease_id)
        await self._run(SETTLE, keys, args)
