"""The Redis backend's two Lua scripts: reserve and settle, each over a batch of requests.

Each script takes ``ARGV[1]``, a msgpack array of operations (the requests one
event-loop iteration gathered), runs every operation atomically in turn (Redis
runs one script at a time), and returns a msgpack array of results. Time comes
from Redis ``TIME`` once per call, so every node and worker shares one clock for
buckets and leases. Values are msgpack (``cmsgpack`` inside Redis).

Keys (``P`` is ``{key_prefix}:{cluster}``; one scope is ``{kind}:{id}``, kind key,
team or global):

- ``P:rl:{scope}:rq`` / ``:tk`` bucket ``[level, stamp_ms]``; expires when it would
  be full again (an absent bucket is a full one).
- ``P:rl:{scope}:cc``  ZSET of concurrency leases, member grant id, score expiry ms.
- ``P:bd:{scope}:{period}`` budget tally ``[spent_tokens, spent_usd, reserved_tokens,
  reserved_usd]``; expires an hour after the UTC day or month it counts.
- ``P:bd:{scope}:{period}:l`` ZSET of budget leases, member ``"{grant} {tokens} {usd}"``.

Leases expire unless renewed; an expired lease is swept (its slot freed, its budget
reservation dropped) by the next script that reads the key.

Reserve operation: ``[grant, lease_ms, tokens, usd, rate, budget, take, wall_ms]`` where
``rate`` is ``[[base, rpm, burst, tpm, concurrent], ...]`` (0: no limit) and
``budget`` is ``[[day_key, month_key, daily_tokens, monthly_tokens, daily_usd,
monthly_usd, day_end_ms, month_end_ms], ...]`` (-1: no cap). Budgets
are checked first, then the rate scopes in order; the first that refuses is
reported, and unless every check passed (and ``take`` is 1) nothing is written
but lease sweeps. Result: ``[ok, position, limit, retry_ms, used, levels,
budget_used]``; ``levels`` is ``[request_level, token_level, in_flight]`` per
rate scope as it stands after the operation, ``budget_used`` ``[day_tokens,
day_usd, month_tokens, month_usd]`` per budget scope (spent plus reserved).

Settle operation: ``[kind, grant, est_tokens, est_usd, tokens, usd, rate, budget,
lease_ms, wall_ms]``, kind 1 settle, 2 release, 3 renew; ``rate`` is ``[[base, tpm,
concurrent], ...]``, ``budget`` ``[[day_key, month_key, day_end_ms,
month_end_ms], ...]``. A tally expires ``end_ms - wall_ms`` from now: the
period's end (plus an hour) by the clock of the node that names the period.
"""

from __future__ import annotations

from typing import Final

_PRELUDE: Final = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ops = cmsgpack.unpack(ARGV[1])
local out = {}

local function bucket_get(key, cap, rate)
  local v = redis.call('GET', key)
  if not v then return cap end
  local b = cmsgpack.unpack(v)
  local l = b[1]
  if now > b[2] then l = l + (now - b[2]) * rate end
  if l > cap then l = cap end
  return l
end

local function bucket_put(key, l, cap, rate)
  if l >= cap then
    redis.call('DEL', key)
  else
    redis.call('SET', key, cmsgpack.pack({l, now}), 'PX', math.ceil((cap - l) / rate) + 1000)
  end
end

-- A budget tally with its expired leases swept out of the reservation.
local function tally_get(key)
  local v = redis.call('GET', key)
  local tl
  if v then tl = cmsgpack.unpack(v) else tl = {0, 0, 0, 0} end
  local lk = key .. ':l'
  local gone = redis.call('ZRANGEBYSCORE', lk, '-inf', now)
  if #gone > 0 then
    for _, m in ipairs(gone) do
      local _, _, tk, us = string.find(m, '^%S+ (%S+) (%S+)$')
      tl[3] = tl[3] - tonumber(tk)
      tl[4] = tl[4] - tonumber(us)
    end
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
    if redis.call('ZCARD', lk) == 0 then tl[3] = 0; tl[4] = 0 end
  end
  return tl
end

local function tally_put(key, tl, expire_in)
  if tl[3] < 0 then tl[3] = 0 end
  if tl[4] < 0 then tl[4] = 0 end
  redis.call('SET', key, cmsgpack.pack({tl[1], tl[2], tl[3], tl[4]}), 'PX', math.max(1000, math.floor(expire_in)))
end
"""

RESERVE: Final = _PRELUDE + r"""
local BNAMES = {'daily_tokens', 'monthly_tokens', 'daily_usd', 'monthly_usd'}
for i, op in ipairs(ops) do
  local gid, lease, tokens, usd, rate, budget, take, wall = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8]
  local ok, pos, code, retry, used = 1, 0, '', 0, 0
  local tallies, bused = {}, {}
  for j, b in ipairs(budget) do
    local td, tm = tally_get(b[1]), tally_get(b[2])
    tallies[j] = {td, tm}
    local u = {td[1] + td[3], tm[1] + tm[3], td[2] + td[4], tm[2] + tm[4]}
    local est = {tokens, tokens, usd, usd}
    bused[j] = {u[1], u[3], u[2], u[4]}
    if ok == 1 then
      for k = 1, 4 do
        local cap = b[2 + k]
        if cap >= 0 and (u[k] >= cap or u[k] + est[k] > cap) then
          ok, pos, code, used = 0, j, BNAMES[k], u[k]
          break
        end
      end
    end
  end
  local nb = #budget
  local levels, rq, tk = {}, {}, {}
  for j, s in ipairs(rate) do
    local base, rpm, burst, tpm, conc = s[1], s[2], s[3], s[4], s[5]
    local n = 0
    if conc > 0 then
      local cc = base .. ':cc'
      redis.call('ZREMRANGEBYSCORE', cc, '-inf', now)
      n = redis.call('ZCARD', cc)
      if ok == 1 and n >= conc then ok, pos, code, retry = 0, nb + j, 'concurrent', 1000 end
    end
    rq[j], tk[j] = 0, 0
    if rpm > 0 then
      local cap = burst > 0 and burst or rpm
      rq[j] = bucket_get(base .. ':rq', cap, rpm / 60000)
      local need = math.min(1, cap)
      if ok == 1 and rq[j] < need then
        ok, pos, code, retry = 0, nb + j, 'requests_per_minute', (need - rq[j]) / (rpm / 60000)
      end
    end
    if tpm > 0 then
      tk[j] = bucket_get(base .. ':tk', tpm, tpm / 60000)
      local need = math.min(tokens, tpm)
      if ok == 1 and tk[j] < need then
        ok, pos, code, retry = 0, nb + j, 'tokens_per_minute', (need - tk[j]) / (tpm / 60000)
      end
    end
    levels[j] = {rq[j], tk[j], n}
  end
  if ok == 1 and take == 1 then
    local member = gid .. ' ' .. tokens .. ' ' .. usd
    for j, b in ipairs(budget) do
      for p = 1, 2 do
        local tl = tallies[j][p]
        tl[3] = tl[3] + tokens
        tl[4] = tl[4] + usd
        tally_put(b[p], tl, b[6 + p] - wall)
        local lk = b[p] .. ':l'
        redis.call('ZADD', lk, now + lease, member)
        redis.call('PEXPIRE', lk, lease + 60000)
      end
      bused[j] = {tallies[j][1][1] + tallies[j][1][3], tallies[j][1][2] + tallies[j][1][4],
                  tallies[j][2][1] + tallies[j][2][3], tallies[j][2][2] + tallies[j][2][4]}
    end
    for j, s in ipairs(rate) do
      local base, rpm, burst, tpm, conc = s[1], s[2], s[3], s[4], s[5]
      if conc > 0 then
        local cc = base .. ':cc'
        redis.call('ZADD', cc, now + lease, gid)
        redis.call('PEXPIRE', cc, lease + 60000)
        levels[j][3] = levels[j][3] + 1
      end
      if rpm > 0 then
        local cap = burst > 0 and burst or rpm
        rq[j] = rq[j] - 1
        bucket_put(base .. ':rq', rq[j], cap, rpm / 60000)
        levels[j][1] = rq[j]
      end
      if tpm > 0 then
        tk[j] = tk[j] - tokens
        bucket_put(base .. ':tk', tk[j], tpm, tpm / 60000)
        levels[j][2] = tk[j]
      end
    end
  end
  out[i] = {ok, pos, code, retry, used, levels, bused}
end
return cmsgpack.pack(out)
"""

SETTLE: Final = _PRELUDE + r"""
for i, op in ipairs(ops) do
  local kind, gid, et, eu, at, au, rate, budget, lease = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8], op[9]
  local wall = op[10]
  local member = gid .. ' ' .. et .. ' ' .. eu
  if kind == 3 then
    for _, s in ipairs(rate) do
      if s[3] > 0 then
        local cc = s[1] .. ':cc'
        redis.call('ZADD', cc, 'XX', now + lease, gid)
        redis.call('PEXPIRE', cc, lease + 60000)
      end
    end
    for _, b in ipairs(budget) do
      for p = 1, 2 do
        local lk = b[p] .. ':l'
        redis.call('ZADD', lk, 'XX', now + lease, member)
        redis.call('PEXPIRE', lk, lease + 60000)
      end
    end
  else
    for _, s in ipairs(rate) do
      local base, tpm, conc = s[1], s[2], s[3]
      if conc > 0 then redis.call('ZREM', base .. ':cc', gid) end
      if tpm > 0 and et ~= at then
        local key = base .. ':tk'
        bucket_put(key, bucket_get(key, tpm, tpm / 60000) + et - at, tpm, tpm / 60000)
      end
    end
    for _, b in ipairs(budget) do
      for p = 1, 2 do
        local tl = tally_get(b[p])
        local lk = b[p] .. ':l'
        if redis.call('ZREM', lk, member) == 1 then
          tl[3] = tl[3] - et
          tl[4] = tl[4] - eu
          if redis.call('ZCARD', lk) == 0 then tl[3] = 0; tl[4] = 0 end
        end
        if kind == 1 then
          tl[1] = tl[1] + at
          tl[2] = tl[2] + au
        end
        tally_put(b[p], tl, b[2 + p] - wall)
      end
    end
  end
  out[i] = 1
end
return cmsgpack.pack(out)
"""
