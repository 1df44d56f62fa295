//! The Lua scripts: one per state transition, each touching the keys of one queue (one hash
//! slot) and doing bounded work.
//!
//! Times are milliseconds of the server's clock (`TIME`). Integers are formatted with
//! `string.format('%d', …)` before they are stored, so no number reaches Redis in exponent
//! notation.

use redis::Script;

/// Shared helpers, prepended to every job script.
const PRELUDE: &str = r#"
local function s(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Ready order: higher priority first, then earlier run-at (ms below 2^42), then id.
local function score(pri, run)
  return (100 - tonumber(pri)) * 4398046511104 + tonumber(run)
end
local F = {'name','queue','payload','pri','state','att','max','tmo','enq','run','err','lease','fin'}
local function fetch(key, id)
  local v = redis.call('HMGET', key, unpack(F))
  table.insert(v, 1, id)
  return v
end
local function signal(sig, seq)
  redis.call('INCR', seq)
  redis.call('LPUSH', sig, '1')
  redis.call('LTRIM', sig, 0, 0)
end
-- Ready jobs live in one sorted set per job name (`rp .. name`); `nk` is the set of names.
local function add_ready(rp, nk, name, sc, id)
  redis.call('ZADD', rp .. name, s(sc), id)
  redis.call('SADD', nk, name)
end
-- Moves due members of a scheduled/retrying set to ready: at most `max`.
local function promote(zk, rp, nk, jp, now, max)
  if tonumber(max) <= 0 then return 0 end
  local ids = redis.call('ZRANGEBYSCORE', zk, '-inf', s(now), 'LIMIT', 0, max)
  for _, id in ipairs(ids) do
    local key = jp .. id
    local v = redis.call('HMGET', key, 'pri', 'run', 'name')
    redis.call('ZREM', zk, id)
    if v[1] then
      redis.call('HSET', key, 'state', 'ready')
      add_ready(rp, nk, v[3], score(v[1], v[2]), id)
    end
  end
  return #ids
end
"#;

/// KEYS: ready prefix, sched, sig, seq, names. ARGV: job prefix, then per job: id, name, queue, payload,
/// priority, run mode (`n`, `a` after ms, `t` at ms), value, max attempts, timeout ms or ``.
const PUSH: &str = r#"
local now = now_ms()
local jp = ARGV[1]
local added = 0
local i = 2
while i + 8 <= #ARGV do
  local id = ARGV[i]
  local key = jp .. id
  if redis.call('EXISTS', key) == 0 then
    local mode = ARGV[i + 5]
    local v = tonumber(ARGV[i + 6])
    local run = now
    if mode == 'a' then run = now + v elseif mode == 't' then run = v end
    local due = run <= now
    local state = 'scheduled'
    if due then state = 'ready' end
    redis.call('HSET', key, 'name', ARGV[i + 1], 'queue', ARGV[i + 2], 'payload', ARGV[i + 3],
      'pri', ARGV[i + 4], 'state', state, 'att', '0', 'max', ARGV[i + 7], 'tmo', ARGV[i + 8],
      'enq', s(now), 'run', s(run))
    if due then
      add_ready(KEYS[1], KEYS[5], ARGV[i + 1], score(ARGV[i + 4], run), id)
    else
      redis.call('ZADD', KEYS[2], s(run), id)
    end
    added = added + 1
  end
  i = i + 9
end
if added > 0 then signal(KEYS[3], KEYS[4]) end
return added
"#;

/// KEYS: ready prefix, sched, retry, run, names. ARGV: job prefix, limit, lease ms, promote
/// max, number of names, the names, then `limit` tokens. Claims only jobs with those names: a
/// merge of the heads of each name's ready set (bounded by names + limit).
const CLAIM: &str = r#"
local now = now_ms()
local jp, rp, nk = ARGV[1], KEYS[1], KEYS[5]
local limit = tonumber(ARGV[2])
local lease = s(now + tonumber(ARGV[3]))
local p = promote(KEYS[2], rp, nk, jp, now, ARGV[4])
promote(KEYS[3], rp, nk, jp, now, tonumber(ARGV[4]) - p)
local nn = tonumber(ARGV[5])
local names = {}
for i = 1, nn do names[i] = ARGV[5 + i] end
local tb = 5 + nn
local function head(name)
  local h = redis.call('ZRANGE', rp .. name, 0, 0, 'WITHSCORES')
  if h[1] then return {tonumber(h[2]), h[1]} end
  return false
end
-- The next job in claim order among the names, removed from its ready set (false at the end).
local next_id
if nn == 1 then
  -- One name (the common case): read the batch in one step.
  local batch = redis.call('ZRANGE', rp .. names[1], 0, limit - 1)
  local pos = 0
  next_id = function()
    pos = pos + 1
    local id = batch[pos]
    if id then redis.call('ZREM', rp .. names[1], id) end
    return id or false
  end
else
  local heads = {}
  for i = 1, nn do heads[i] = head(names[i]) end
  next_id = function()
    local best = 0
    for i = 1, nn do
      local h = heads[i]
      if h then
        if best == 0 then best = i else
          local b = heads[best]
          if h[1] < b[1] or (h[1] == b[1] and h[2] < b[2]) then best = i end
        end
      end
    end
    if best == 0 then return false end
    local id = heads[best][2]
    redis.call('ZREM', rp .. names[best], id)
    heads[best] = head(names[best])
    return id
  end
end
local out = {}
local taken = 0
while taken < limit do
  local id = next_id()
  if not id then break end
  local key = jp .. id
  if redis.call('EXISTS', key) == 1 then
    taken = taken + 1
    local tok = ARGV[tb + taken]
    redis.call('HINCRBY', key, 'att', 1)
    redis.call('HSET', key, 'state', 'running', 'tok', tok, 'lease', lease)
    redis.call('ZADD', KEYS[4], lease, id)
    local v = fetch(key, id)
    table.insert(v, tok)
    table.insert(out, v)
  end
end
return out
"#;

/// KEYS: ready prefix, retry, run, done, dead, sig, seq, names. ARGV: job prefix, then per item: id, token,
/// kind (`s` succeeded, `x` succeeded and deleted, `r` retry, `d` dead, `l` release), delay ms,
/// error.
const FINISH: &str = r#"
local now = now_ms()
local jp = ARGV[1]
local out = {}
local wake = false
local i = 2
while i + 4 <= #ARGV do
  local id = ARGV[i]
  local key = jp .. id
  local v = redis.call('HMGET', key, 'state', 'tok', 'pri', 'run', 'att', 'name')
  if v[1] == 'running' and v[2] == ARGV[i + 1] then
    redis.call('ZREM', KEYS[3], id)
    local kind = ARGV[i + 2]
    if kind == 'x' then
      redis.call('DEL', key)
    else
      redis.call('HDEL', key, 'tok', 'lease')
      if kind == 's' then
        redis.call('HSET', key, 'state', 'succeeded', 'fin', s(now))
        redis.call('ZADD', KEYS[4], s(now), id)
      elseif kind == 'd' then
        redis.call('HSET', key, 'state', 'dead', 'fin', s(now), 'err', ARGV[i + 4])
        redis.call('ZADD', KEYS[5], s(now), id)
      elseif kind == 'r' then
        local d = tonumber(ARGV[i + 3])
        local run = now + d
        redis.call('HSET', key, 'err', ARGV[i + 4], 'run', s(run))
        if d <= 0 then
          redis.call('HSET', key, 'state', 'ready')
          add_ready(KEYS[1], KEYS[8], v[6], score(v[3], run), id)
        else
          redis.call('HSET', key, 'state', 'retrying')
          redis.call('ZADD', KEYS[2], s(run), id)
        end
        wake = true
      else
        local att = tonumber(v[5]) - 1
        if att < 0 then att = 0 end
        redis.call('HSET', key, 'state', 'ready', 'att', s(att))
        add_ready(KEYS[1], KEYS[8], v[6], score(v[3], v[4]), id)
        wake = true
      end
    end
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
  i = i + 5
end
if wake then signal(KEYS[6], KEYS[7]) end
return out
"#;

/// KEYS: run. ARGV: job prefix, lease ms, then pairs of id, token.
const HEARTBEAT: &str = r#"
local now = now_ms()
local lease = s(now + tonumber(ARGV[2]))
local out = {}
for i = 3, #ARGV, 2 do
  local key = ARGV[1] .. ARGV[i]
  local v = redis.call('HMGET', key, 'state', 'tok')
  if v[1] == 'running' and v[2] == ARGV[i + 1] then
    redis.call('HSET', key, 'lease', lease)
    redis.call('ZADD', KEYS[1], lease, ARGV[i])
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
end
return out
"#;

/// KEYS: ready prefix, sched, retry, run, done, dead, sig, seq, names. ARGV: job prefix, promote budget,
/// reap budget, prune budget, succeeded ttl ms, dead ttl ms.
const MAINTAIN: &str = r#"
local now = now_ms()
local jp = ARGV[1]
local promoted = promote(KEYS[2], KEYS[1], KEYS[9], jp, now, ARGV[2])
promoted = promoted + promote(KEYS[3], KEYS[1], KEYS[9], jp, now, tonumber(ARGV[2]) - promoted)
local recovered, dead = 0, 0
if tonumber(ARGV[3]) > 0 then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', s(now), 'LIMIT', 0, ARGV[3])
  for _, id in ipairs(ids) do
    redis.call('ZREM', KEYS[4], id)
    local key = jp .. id
    local v = redis.call('HMGET', key, 'state', 'att', 'max', 'pri', 'run', 'name')
    if v[1] == 'running' then
      redis.call('HDEL', key, 'tok', 'lease')
      if tonumber(v[2]) >= tonumber(v[3]) then
        redis.call('HSET', key, 'state', 'dead', 'fin', s(now), 'err',
          'lease expired: the worker was lost during attempt ' .. v[2] .. ' of ' .. v[3])
        redis.call('ZADD', KEYS[6], s(now), id)
        dead = dead + 1
      else
        redis.call('HSET', key, 'state', 'ready', 'err',
          'lease expired: the worker was lost during attempt ' .. v[2])
        add_ready(KEYS[1], KEYS[9], v[6], score(v[4], v[5]), id)
        recovered = recovered + 1
      end
    end
  end
end
local pruned = 0
local budget = tonumber(ARGV[4])
local sets = {{KEYS[5], ARGV[5]}, {KEYS[6], ARGV[6]}}
for _, pair in ipairs(sets) do
  if budget - pruned > 0 then
    local cutoff = s(now - tonumber(pair[2]))
    local ids = redis.call('ZRANGEBYSCORE', pair[1], '-inf', cutoff, 'LIMIT', 0, budget - pruned)
    for _, id in ipairs(ids) do
      redis.call('ZREM', pair[1], id)
      redis.call('DEL', jp .. id)
      pruned = pruned + 1
    end
  end
end
if promoted + recovered > 0 then signal(KEYS[7], KEYS[8]) end
return {promoted, recovered, dead, pruned}
"#;

/// KEYS: seq, sched, retry. Returns the wake-up counter and the ms until the earliest
/// delayed job (-1 for none).
const PEEK: &str = r#"
local now = now_ms()
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local best = -1
for _, k in ipairs({KEYS[2], KEYS[3]}) do
  local f = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if f[2] then
    local d = tonumber(f[2]) - now
    if d < 0 then d = 0 end
    if best < 0 or d < best then best = d end
  end
end
return {seq, best}
"#;

/// KEYS: ready prefix, sched, retry, done, dead, sig, seq, names. ARGV: job key, id, operation (`cancel`,
/// `delete`, `retry`).
const OPERATE: &str = r#"
local key, id, op = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('HMGET', key, 'state', 'pri', 'name')
local st = v[1]
if not st then return 0 end
local sets = {ready = KEYS[1] .. v[3], scheduled = KEYS[2], retrying = KEYS[3], succeeded = KEYS[4], dead = KEYS[5]}
if op == 'retry' then
  if st ~= 'dead' then return 0 end
  local now = now_ms()
  redis.call('ZREM', KEYS[5], id)
  redis.call('HDEL', key, 'fin')
  redis.call('HSET', key, 'state', 'ready', 'att', '0', 'run', s(now))
  add_ready(KEYS[1], KEYS[8], v[3], score(v[2], now), id)
  signal(KEYS[6], KEYS[7])
  return 1
end
if op == 'cancel' and st ~= 'ready' and st ~= 'scheduled' and st ~= 'retrying' then return 0 end
if not sets[st] then return 0 end
redis.call('ZREM', sets[st], id)
redis.call('DEL', key)
return 1
"#;

/// KEYS: names, sched, retry, run, done, dead. ARGV: ready prefix. Returns the counts of
/// scheduled, ready, running, retrying, succeeded and dead jobs.
const COUNT: &str = r#"
local ready = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  ready = ready + redis.call('ZCARD', ARGV[1] .. name)
end
return {redis.call('ZCARD', KEYS[2]), ready, redis.call('ZCARD', KEYS[4]),
  redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[5]), redis.call('ZCARD', KEYS[6])}
"#;

/// KEYS: one state's set. ARGV: job prefix, most to remove. Returns how many it removed.
const PURGE: &str = r#"
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', ARGV[1] .. id)
end
return #ids
"#;

/// KEYS: lock. ARGV: owner, ttl ms.
const LOCK_ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: lock. ARGV: owner, ttl ms.
const LOCK_RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: lock. ARGV: owner.
const LOCK_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

pub(crate) struct Scripts {
    pub(crate) push: Script,
    pub(crate) claim: Script,
    pub(crate) finish: Script,
    pub(crate) heartbeat: Script,
    pub(crate) maintain: Script,
    pub(crate) peek: Script,
    pub(crate) operate: Script,
    pub(crate) purge: Script,
    pub(crate) count: Script,
    pub(crate) lock_acquire: Script,
    pub(crate) lock_renew: Script,
    pub(crate) lock_release: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let job = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            push: job(PUSH),
            claim: job(CLAIM),
            finish: job(FINISH),
            heartbeat: job(HEARTBEAT),
            maintain: job(MAINTAIN),
            peek: job(PEEK),
            operate: job(OPERATE),
            purge: Script::new(PURGE),
            count: Script::new(COUNT),
            lock_acquire: Script::new(LOCK_ACQUIRE),
            lock_renew: Script::new(LOCK_RENEW),
            lock_release: Script::new(LOCK_RELEASE),
        }
    }
}
