//! The Lua scripts the shared limits run on Redis, each one atomic decision on Redis server time:
//! the request GCRA (with leases), the token budget, and the worker registry.

/// GCRA on Redis server time. Grants as many of the wanted cells as conform now.
pub(super) const GCRA_LUA: &str = r"
-- KEYS[1]: the endpoint's TAT in microseconds of Redis server time.
-- ARGV: emission interval T (us), burst tolerance tau (us), cells wanted.
-- Returns {granted, wait_us}: wait_us is how long until one more cell would conform.
-- Before Redis 5, TIME followed by writes needs effects replication; later it is the default.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
-- A missing key is an endpoint idle for over a second (or never used): start with an empty
-- bucket so it comes back at its steady rate instead of with a burst every worker shares in.
local tat = tonumber(redis.call('GET', KEYS[1])) or (now + tau)
if tat < now then tat = now end
-- Cell k (1-based) conforms when tat + k*t - (tau + t) <= now.
local granted = math.floor((now + tau + t - tat) / t)
if granted > want then granted = want end
if granted < 0 then granted = 0 end
if granted > 0 then
  tat = tat + granted * t
  -- Past its TAT the key means the same as no key, so let it expire soon after.
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
end
local wait = tat - tau - now
if wait < 0 then wait = 0 end
return {granted, wait}
";

/// A token budget on Redis server time: all-or-nothing takes, and corrections after the call.
pub(super) const TOKENS_LUA: &str = r"
-- KEYS[1]: the endpoint's token TAT in microseconds of Redis server time.
-- ARGV: time per token T (us, fractional), burst tolerance tau (us), tokens, mode:
--   'take' records the tokens only if they conform now; 'charge' records them regardless (the
--   real usage was above the estimate); 'refund' gives them back (it was below).
-- Returns {1, 0} when recorded, or {0, wait_us} when a take does not conform yet.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) * t
local mode = ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if mode == 'take' then
  -- A call larger than the whole burst conforms once the budget is idle, as locally.
  local tolerance = math.max(tau + t, cost)
  local wait = tat + cost - tolerance - now
  if wait > 0 then return {0, math.ceil(wait)} end
  tat = tat + cost
elseif mode == 'charge' then
  tat = tat + cost
else
  tat = math.max(tat - cost, now)
end
local ttl_ms = math.ceil((tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
";

/// Heartbeat registry: refresh this worker (unless ARGV[1] is empty), drop stale ones, count.
pub(super) const HEARTBEAT_LUA: &str = r"
-- KEYS[1]: sorted set of worker ids scored by last heartbeat, ms of Redis server time.
-- ARGV[1]: worker id to refresh, or '' to only count. ARGV[2]: TTL in ms.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl * 2))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - ttl))
return redis.call('ZCARD', KEYS[1])
";
