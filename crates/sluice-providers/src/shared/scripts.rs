//! The Lua scripts the shared limits run on Redis, each one atomic decision on Redis server time:
//! the request GCRA (with leases and the probe after idle), the token budget, the worker registry.

/// GCRA on Redis server time. Grants as many of the wanted cells as conform now; after idle, with
/// probing on, one probe instead (see [`PROBE_LUA`]).
pub(super) const GCRA_LUA: &str = r"
-- KEYS[1]: the endpoint's TAT in microseconds of Redis server time.
-- KEYS[2]: the probe after idle while it is out: its token, expiring when its hold ends.
-- ARGV: emission interval T (us), burst tolerance tau (us), cells wanted, probe hold (us; 0:
--   no probing), probe token.
-- Returns {granted, wait_us, probe}: wait_us is how long until one more cell would conform;
-- probe is 1 when the one cell granted is the probe after idle.
-- Before Redis 5, TIME followed by writes needs effects replication; later it is the default.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
-- While a probe is out, ask again this often (us): its report may fill the bucket any moment.
local poll = 10000
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stored = tonumber(redis.call('GET', KEYS[1]))
-- A missing key is an endpoint idle for over a second (or never used).
if not stored and hold > 0 then
  -- This call is the probe: nothing else conforms until its response reports the provider's
  -- remaining budget (PROBE_LUA) or its hold ends, after which the bucket is empty.
  local tat = now + hold + tau
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
  redis.call('SET', KEYS[2], ARGV[5], 'PX', string.format('%.0f', math.ceil(hold / 1000)))
  return {1, poll, 1}
end
-- Without probing, start with an empty bucket so the endpoint comes back at its steady rate
-- instead of with a burst every worker shares in.
local tat = stored or (now + tau)
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
if granted == 0 and hold > 0 and wait > poll and redis.call('EXISTS', KEYS[2]) == 1 then
  wait = poll
end
return {granted, wait, 0}
";

/// The outcome of the probe after idle: its report of the provider's remaining requests fills the
/// shared bucket, once, and only while the probe's hold lasts.
pub(super) const PROBE_LUA: &str = r"
-- KEYS[1]: the endpoint's TAT (us of Redis server time). KEYS[2]: the probe's token while out.
-- ARGV: probe token, emission interval T (us), burst tolerance tau (us), the provider's
--   remaining requests, or -1 when the probe brought no report (failed, or no headers).
-- Returns 1 if the probe was still out (now settled), 0 if its hold had ended (nothing changes).
if redis.replicate_commands then pcall(redis.replicate_commands) end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local t = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local cells = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat
if cells < 0 then
  -- Nothing learnt: an empty bucket, as without probing.
  tat = now + tau
else
  -- The provider holds `cells` for us and nothing else of ours is in flight: that many at once,
  -- but no more than the burst (the probe was the bucket's first cell), so every window still
  -- sees at most rate * W + burst + 1.
  local most = math.floor(tau / t)
  if cells > most then cells = most end
  tat = now + tau + t - cells * t
end
local ttl_ms = math.ceil((tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
return 1
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
