//! The Lua scripts: one per state transition, each touching the keys of one queue (one hash
//! slot) and doing bounded work.
//!
//! Times are milliseconds of the server's clock (`TIME`). Integers are formatted with
//! `string.format('%d', …)` before they are stored, so no number reaches Redis in exponent
//! notation.
//!
//! A job hash may hold values Backline never writes (rewritten by hand or by another client).
//! No script trusts a stored field: each reads the fields it computes with through `problems`
//! before any write to that job, and `kill` makes a job whose fields do not read dead within the
//! same call, so that a bad value never raises a script error (Redis keeps the writes a script
//! made before an error: a half-done transition, an orphaned job) and never blocks the queue.

use redis::Script;

/// Shared helpers, prepended to every job script: the clock, the ready order, wake-ups, and
/// the checked reading of stored fields with `kill` for a job whose fields do not read.
const PRELUDE: &str = r#"
local function s(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Ready order: higher priority first, then earlier run-at (ms below 2^42), then id.
local function score(pri, run)
  return (100 - pri) * 4398046511104 + run
end
local F = {'name','queue','payload','pri','state','att','max','tmo','enq','run','err','lease','fin'}
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

-- Stored fields are read through `problems` before a script computes with them or writes the
-- job: a hash may have been rewritten by hand or by another client. The rules are those of
-- `parse_job` in lib.rs (keep the two in step): integers as `s` writes them (an optional minus
-- and at most 15 digits, exact in a double), in the ranges below; `opt` fields may be absent or
-- empty; name, queue, payload and state must be present, state one of the six.
local INTS = {
  pri = {lo = 5, hi = 25}, att = {lo = 0, hi = 4294967295}, max = {lo = 1, hi = 4294967295},
  tmo = {lo = 0, opt = true}, enq = {}, run = {}, lease = {opt = true}, fin = {opt = true},
}
local STATES = {scheduled = 1, ready = 1, running = 1, retrying = 1, succeeded = 1, dead = 1}
local function quote(x)
  if #x > 64 then return "'" .. string.sub(x, 1, 64) .. "…'" end
  return "'" .. x .. "'"
end
-- What is wrong with the value `x` of field `f` (false for an absent field), or nil.
local function problem(f, x)
  local r = INTS[f]
  if r then
    if x == false or x == '' then
      if r.opt then return nil end
      if x == false then return 'missing' end
      return "'' is not a number"
    end
    local digits = string.match(x, '^%-?(%d+)$')
    if not digits or #digits > 15 then return quote(x) .. ' is not a number' end
    local n = tonumber(x)
    if r.hi and (n < r.lo or n > r.hi) then
      return quote(x) .. ' is out of range (' .. s(r.lo) .. ' to ' .. s(r.hi) .. ')'
    end
    if r.lo and n < r.lo then return quote(x) .. ' is below ' .. s(r.lo) end
    return nil
  end
  if x == false then return 'missing' end
  if f == 'state' and not STATES[x] then return quote(x) .. ' is not a job state' end
  return nil
end
-- The problems of the fields `fs` of a job whose values are `v` (by field name): a list of
-- {field, problem}, or nil when every one reads.
local function problems(v, fs)
  local bad
  for _, f in ipairs(fs) do
    local p = problem(f, v[f])
    if p then
      bad = bad or {}
      table.insert(bad, {f, p})
    end
  end
  return bad
end
-- The values a dead job takes in the place of bad fields it can do without (the stored values
-- are quoted in its `err`), so that it reads afterwards and an operator can retry it. Name,
-- queue and payload are never invented; state, lease and fin are written by `kill` anyway.
-- The priority becomes Normal (15), attempts 0, at most 1 attempt, no time-out, times now.
local FIX = {pri = function() return '15' end, att = function() return '0' end,
  max = function() return '1' end, tmo = function() return '' end,
  enq = function(now) return s(now) end, run = function(now) return s(now) end}
-- The jobs a script made dead because their fields do not read: {id, 'field F', problem}
-- each, returned to the caller, which logs them.
local KILLED = {}
-- Makes the job `id` dead, in this same script, because of the problems `bad` (from
-- `problems`): state dead, `err` naming each bad field and its value, `fin` now, out of the
-- sets `from` and into the dead set `dk`. Called before any other write to the job.
local function kill(key, id, bad, now, dk, from)
  -- The first problem, then 'field F: problem' for each further one.
  local first = bad[1][2]
  for i = 2, #bad do first = first .. '; field ' .. bad[i][1] .. ': ' .. bad[i][2] end
  local reason = 'the stored job cannot be read: field ' .. bad[1][1] .. ': ' .. first
  local args = {'state', 'dead', 'fin', s(now), 'err', reason}
  for _, b in ipairs(bad) do
    local fix = FIX[b[1]]
    if fix then
      table.insert(args, b[1])
      table.insert(args, fix(now))
    end
  end
  redis.call('HDEL', key, 'tok', 'lease')
  redis.call('HSET', key, unpack(args))
  for _, z in ipairs(from) do redis.call('ZREM', z, id) end
  redis.call('ZADD', dk, s(now), id)
  table.insert(KILLED, {id, 'field ' .. bad[1][1], first})
end
-- Reads the fields `fs` of the job at `key`: a table by field name, or nil when the hash is gone.
local function read(key, fs)
  local h = redis.call('HMGET', key, unpack(fs))
  local v, any = {}, false
  for i, f in ipairs(fs) do
    v[f] = h[i]
    if h[i] then any = true end
  end
  if not any and redis.call('EXISTS', key) == 0 then return nil end
  return v
end
local PROMOTED = {'pri', 'run', 'name'}
-- Moves due members of a scheduled/retrying set `zk` to ready, at most `max`; a job whose
-- fields do not read goes to the dead set `dk` instead. Returns how many members it took and
-- how many of them it made ready.
local function promote(zk, rp, nk, dk, jp, now, max)
  if max <= 0 then return 0, 0 end
  local ids = redis.call('ZRANGEBYSCORE', zk, '-inf', s(now), 'LIMIT', 0, max)
  local moved = 0
  for _, id in ipairs(ids) do
    local key = jp .. id
    local v = read(key, PROMOTED)
    local bad = v and problems(v, PROMOTED)
    if not v then
      redis.call('ZREM', zk, id)
    elseif bad then
      kill(key, id, bad, now, dk, {zk})
    else
      redis.call('ZREM', zk, id)
      redis.call('HSET', key, 'state', 'ready')
      add_ready(rp, nk, v.name, score(tonumber(v.pri), tonumber(v.run)), id)
      moved = moved + 1
    end
  end
  return #ids, moved
end
"#;

/// KEYS: ready prefix, sched, sig, seq, names. ARGV: job prefix, then per job: id, name, queue, payload,
/// priority, run mode (`n`, `a` after ms, `t` at ms), value, max attempts, timeout ms or ``.
///
/// Reads no stored field (an existing id is left as it is), so a bad hash cannot fail it.
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
      add_ready(KEYS[1], KEYS[5], ARGV[i + 1], score(tonumber(ARGV[i + 4]), run), id)
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

/// KEYS: ready prefix, sched, retry, run, names, dead. ARGV: job prefix, limit, lease ms,
/// promote max, number of names, the names, then `limit` tokens. Claims only jobs with those
/// names: a merge of the heads of each name's ready set (bounded by names + limit).
///
/// Looks at most `limit` ready jobs: each is claimed, or made dead when a field it hands back
/// does not read (checked before anything is written to it), or skipped when its hash is gone.
/// Returns `{rows, killed, skipped}`: a row per claimed job (`F` after the id, then the
/// token), the jobs made dead (`KILLED`, promotion's included) and how many ready entries
/// were not claimed (dead or gone), so the caller knows a short batch is no empty queue.
const CLAIM: &str = r#"
local now = now_ms()
local jp, rp, nk, dk = ARGV[1], KEYS[1], KEYS[5], KEYS[6]
local limit = tonumber(ARGV[2])
local lease = s(now + tonumber(ARGV[3]))
local budget = tonumber(ARGV[4])
local p = promote(KEYS[2], rp, nk, dk, jp, now, budget)
promote(KEYS[3], rp, nk, dk, jp, now, budget - p)
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
-- The fields a claimed job hands back or a later script computes with (state and lease are
-- written here).
local CHECKED = {'name', 'queue', 'payload', 'pri', 'att', 'max', 'tmo', 'enq', 'run', 'fin'}
local out = {}
local taken, looked = 0, 0
while looked < limit do
  local id = next_id()
  if not id then break end
  looked = looked + 1
  local key = jp .. id
  local v = read(key, F)
  local bad = v and problems(v, CHECKED)
  if bad then
    kill(key, id, bad, now, dk, {})
  elseif v then
    taken = taken + 1
    local tok = ARGV[tb + taken]
    local att = s(tonumber(v.att) + 1)
    redis.call('HSET', key, 'state', 'running', 'tok', tok, 'lease', lease, 'att', att)
    redis.call('ZADD', KEYS[4], lease, id)
    table.insert(out, {id, v.name, v.queue, v.payload, v.pri, 'running', att, v.max, v.tmo,
      v.enq, v.run, v.err, lease, v.fin, tok})
  end
end
return {out, KILLED, looked - taken}
"#;

/// KEYS: ready prefix, retry, run, done, dead, sig, seq, names. ARGV: job prefix, then per item: id, token,
/// kind (`s` succeeded, `x` succeeded and deleted, `r` retry, `d` dead, `l` release), delay ms,
/// error.
///
/// Returns `{applied, killed}`: 1 or 0 per item, and the jobs made dead (`KILLED`) because a
/// retry or a release found a field it computes with unreadable (the item still counts as
/// applied: the lease was held and the job is finished).
const FINISH: &str = r#"
local now = now_ms()
local jp = ARGV[1]
local out = {}
local wake = false
local RETRIED = {'pri', 'name'}
local RELEASED = {'pri', 'run', 'att', 'name'}
local i = 2
while i + 4 <= #ARGV do
  local id = ARGV[i]
  local key = jp .. id
  local h = redis.call('HMGET', key, 'state', 'tok', 'pri', 'run', 'att', 'name')
  if h[1] == 'running' and h[2] == ARGV[i + 1] then
    local v = {pri = h[3], run = h[4], att = h[5], name = h[6]}
    local kind = ARGV[i + 2]
    local bad
    if kind == 'r' then bad = problems(v, RETRIED) elseif kind == 'l' then bad = problems(v, RELEASED) end
    if bad then
      kill(key, id, bad, now, KEYS[5], {KEYS[3]})
    elseif kind == 'x' then
      redis.call('ZREM', KEYS[3], id)
      redis.call('DEL', key)
    else
      redis.call('ZREM', KEYS[3], id)
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
          add_ready(KEYS[1], KEYS[8], v.name, score(tonumber(v.pri), run), id)
        else
          redis.call('HSET', key, 'state', 'retrying')
          redis.call('ZADD', KEYS[2], s(run), id)
        end
        wake = true
      else
        local att = tonumber(v.att) - 1
        if att < 0 then att = 0 end
        redis.call('HSET', key, 'state', 'ready', 'att', s(att))
        add_ready(KEYS[1], KEYS[8], v.name, score(tonumber(v.pri), tonumber(v.run)), id)
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
return {out, KILLED}
"#;

/// KEYS: run. ARGV: job prefix, lease ms, then pairs of id, token.
///
/// Reads only state and token (compared as strings), so a bad hash cannot fail it.
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
/// reap budget, prune budget, succeeded ttl ms, dead ttl ms, then the two parts of the
/// lease-expired text (`provider::LEASE_EXPIRED_PREFIX` and `LEASE_EXPIRED_OF`).
///
/// Returns `{promoted, recovered, dead, pruned, taken, killed}`: `taken` is how many due
/// delayed entries promotion took (made ready, dead or gone), for the caller's loop; an expired
/// lease whose job does not read counts in `dead`; `killed` is `KILLED`.
const MAINTAIN: &str = r#"
local now = now_ms()
local jp = ARGV[1]
local pbudget = tonumber(ARGV[2])
local taken, promoted = promote(KEYS[2], KEYS[1], KEYS[9], KEYS[6], jp, now, pbudget)
local t2, p2 = promote(KEYS[3], KEYS[1], KEYS[9], KEYS[6], jp, now, pbudget - taken)
taken, promoted = taken + t2, promoted + p2
local REAPED = {'att', 'max', 'pri', 'run', 'name'}
local recovered, dead = 0, 0
if tonumber(ARGV[3]) > 0 then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', s(now), 'LIMIT', 0, ARGV[3])
  for _, id in ipairs(ids) do
    local key = jp .. id
    local h = redis.call('HMGET', key, 'state', 'att', 'max', 'pri', 'run', 'name')
    local v = {att = h[2], max = h[3], pri = h[4], run = h[5], name = h[6]}
    local bad = h[1] == 'running' and problems(v, REAPED)
    if bad then
      kill(key, id, bad, now, KEYS[6], {KEYS[4]})
      dead = dead + 1
    else
      redis.call('ZREM', KEYS[4], id)
      if h[1] == 'running' then
        redis.call('HDEL', key, 'tok', 'lease')
        if tonumber(v.att) >= tonumber(v.max) then
          redis.call('HSET', key, 'state', 'dead', 'fin', s(now), 'err',
            ARGV[7] .. v.att .. ARGV[8] .. v.max)
          redis.call('ZADD', KEYS[6], s(now), id)
          dead = dead + 1
        else
          redis.call('HSET', key, 'state', 'ready', 'err', ARGV[7] .. v.att)
          add_ready(KEYS[1], KEYS[9], v.name, score(tonumber(v.pri), tonumber(v.run)), id)
          recovered = recovered + 1
        end
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
return {promoted, recovered, dead, pruned, taken, KILLED}
"#;

/// KEYS: seq, sched, retry. Returns the wake-up counter and the ms until the earliest
/// delayed job (-1 for none). Reads no job hash.
const PEEK: &str = r#"
local now = now_ms()
local seq = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
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
///
/// Returns 1 or 0 (done or not); a retry of a dead job whose priority or name does not read
/// returns `{'field F', problem}` and changes nothing. A delete of a job whose state or name
/// does not read removes it from every set it may be in.
const OPERATE: &str = r#"
local key, id, op = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('HMGET', key, 'state', 'pri', 'name')
local st = v[1]
if not st then
  if op ~= 'delete' or redis.call('EXISTS', key) == 0 then return 0 end
end
if op == 'retry' then
  if st ~= 'dead' then return 0 end
  local bad = problems({pri = v[2], name = v[3]}, {'pri', 'name'})
  if bad then return {'field ' .. bad[1][1], bad[1][2]} end
  local now = now_ms()
  redis.call('ZREM', KEYS[5], id)
  redis.call('HDEL', key, 'fin')
  redis.call('HSET', key, 'state', 'ready', 'att', '0', 'run', s(now))
  add_ready(KEYS[1], KEYS[8], v[3], score(tonumber(v[2]), now), id)
  signal(KEYS[6], KEYS[7])
  return 1
end
if op == 'cancel' and st ~= 'ready' and st ~= 'scheduled' and st ~= 'retrying' then return 0 end
if st == 'running' then return 0 end
local sets = {scheduled = KEYS[2], retrying = KEYS[3], succeeded = KEYS[4], dead = KEYS[5]}
if v[3] then sets.ready = KEYS[1] .. v[3] end
if sets[st] then
  redis.call('ZREM', sets[st], id)
else
  -- A state or name that does not read: the job may be in any set but the ready sets of other
  -- names (a claim skips an entry whose hash is gone).
  for _, z in pairs(sets) do redis.call('ZREM', z, id) end
end
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
