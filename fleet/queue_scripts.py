"""The shared fair queue's Lua scripts (fleet.shared_scheduler says why it is built this way).

Every script gets the key prefix, a random integer (to break ties between hosts, as `random.choice` does in
fleet.scheduler) and the lease in milliseconds as its first three arguments, and reads the time itself
(`TIME`: Redis's clock, the only one every replica agrees on). Keys are built inside the scripts from the
prefix, as the queue needs them (a person's line is known only once their turn comes): a standalone Redis
(or one behind Sentinel) runs them as they are; Redis Cluster is not supported.

Keys under the prefix (model names hold `:`, so a model comes last; people and API keys are quoted):
- `slots:<host>:<model>`, `hostrun:<host>`, `modelrun:<model>`, `userrun:<user>`, `keyrun:<key>`: sorted
  sets of the requests running there, each scored with its expiry, dropped once expired;
- `userwait:<user>`, `keywait:<key>`: the same for the requests waiting (the waiting caps);
- `waiter:<id>`: one request, waiting (`st` waiting) or granted (`st` granted, `h` its host): a hash that
  expires with its replica's renewals;
- `line:<band>:<user>:<model>`: a person's requests waiting in a band, in order; `people:<band>:<model>`:
  who waits there; `queued`: the models with someone waiting (scored with an expiry);
- `fair:<model>`: the band clocks (`c<band>`) and every person's virtual time (`v<band>:<user>`);
- `cost`: each model's running average of slot-seconds; `order`: a counter ordering arrivals;
- `replicas`: the live replicas, scored with the expiry of their last heartbeat.
A grant is published on `replica:<id>`, the channel of the replica holding the waiter's connection.
"""

from fleet.scheduler import COST_SMOOTHING, DEFAULT_COST, MAX_MODELS_COSTED

# A model's fair-share history outlives its last write by this much at most (it is dropped as soon as
# nothing waits or runs there; this only bounds what a replica that died mid-release leaves behind).
HISTORY_MS = 24 * 3600 * 1000

_COMMON = f"""
local P, lease = ARGV[1], tonumber(ARGV[3])
local rand = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local DEFAULT_COST, SMOOTHING = {DEFAULT_COST!r}, {COST_SMOOTHING!r}
local MAX_COSTED, HISTORY = {MAX_MODELS_COSTED}, {HISTORY_MS}
local BANDS = {{'0', '1'}}

local function num(x) return string.format('%.17g', x) end

local function next_random()
  rand = (rand * 1103515245 + 12345) % 2147483648
  return rand
end

-- Push a key's expiry out to `at` (never in): it lives as long as its longest-lived member.
local function keep(key, at)
  local ttl = redis.call('PTTL', key)
  if ttl == -1 or (ttl >= 0 and now + ttl < at) then redis.call('PEXPIREAT', key, at) end
end

local function hold(key, member, at)
  redis.call('ZADD', key, at, member)
  keep(key, at)
end

local function live(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end

local function record(id)
  local flat = redis.call('HGETALL', P .. 'waiter:' .. id)
  if #flat == 0 then return nil end
  local r = {{}}
  for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
  return r
end

local function line_key(model, band, user) return P .. 'line:' .. band .. ':' .. user .. ':' .. model end
local function people_key(model, band) return P .. 'people:' .. band .. ':' .. model end
local function fair_key(model) return P .. 'fair:' .. model end

local function cost_of(model)
  return tonumber(redis.call('HGET', P .. 'cost', model)) or DEFAULT_COST
end

local function learn_cost(model, seconds)
  local key = P .. 'cost'
  local previous = tonumber(redis.call('HGET', key, model))
  if previous == nil and redis.call('HLEN', key) >= MAX_COSTED then
    redis.call('HDEL', key, redis.call('HRANDFIELD', key))  -- a bounded table, whatever is asked
  end
  local smoothed = seconds
  if previous ~= nil then smoothed = previous + SMOOTHING * (seconds - previous) end
  redis.call('HSET', key, model, num(smoothed))
end

local function vtimes(model, band, user)
  local fair = fair_key(model)
  local band_clock = tonumber(redis.call('HGET', fair, 'c' .. band)) or 0
  local mine = tonumber(redis.call('HGET', fair, 'v' .. band .. ':' .. user)) or band_clock
  return fair, band_clock, mine
end

local function nobody_waits(model)
  return redis.call('EXISTS', people_key(model, '0'), people_key(model, '1')) == 0
end

-- The keys a grant is counted in.
local function grant_keys(r)
  local keys = {{
    P .. 'slots:' .. r.q .. ':' .. r.m, P .. 'hostrun:' .. r.q,
    P .. 'modelrun:' .. r.m, P .. 'userrun:' .. r.u
  }}
  if r.k ~= '' then keys[#keys + 1] = P .. 'keyrun:' .. r.k end
  return keys
end

local function remove_waiter(id, r)
  local line = line_key(r.m, r.b, r.u)
  redis.call('LREM', line, 0, id)
  if redis.call('LLEN', line) == 0 then redis.call('SREM', people_key(r.m, r.b), r.u) end
  redis.call('ZREM', P .. 'userwait:' .. r.u, id)
  if r.k ~= '' then redis.call('ZREM', P .. 'keywait:' .. r.k, id) end
  redis.call('DEL', P .. 'waiter:' .. id)
  if nobody_waits(r.m) then redis.call('ZREM', P .. 'queued', r.m) end
end

-- Candidates from ARGV[at] on: their count, then per host its id, its quoted id, slots (-1: unknown),
-- loaded (1/0), on trial (1/0): the calling replica's view of which hosts may serve the model now.
local function parse_candidates(at)
  local list = {{}}
  for i = 0, tonumber(ARGV[at]) - 1 do
    local b = at + 1 + i * 5
    list[#list + 1] = {{
      host = ARGV[b], q = ARGV[b + 1], slots = tonumber(ARGV[b + 2]),
      loaded = ARGV[b + 3] == '1', trial = ARGV[b + 4] == '1'
    }}
  end
  return list
end

-- fleet.scheduler's _pick_host: loaded there first, then the least loaded; a host on trial takes one
-- request at a time; ties at random. nil: every slot is taken.
local function pick_host(model, candidates, avoid)
  local best, best_cold, best_load = {{}}, nil, nil
  for _, c in ipairs(candidates) do
    if not avoid[c.host] then
      local inflight = live(P .. 'slots:' .. c.q .. ':' .. model)
      local free = c.slots < 0 or inflight < c.slots
      if free and c.trial and live(P .. 'hostrun:' .. c.q) > 0 then free = false end
      if free then
        local cold = c.loaded and 0 or 1
        local load = inflight
        if c.slots > 0 then load = inflight / c.slots end
        if best_cold == nil or cold < best_cold or (cold == best_cold and load < best_load) then
          best, best_cold, best_load = {{c}}, cold, load
        elseif cold == best_cold and load == best_load then
          best[#best + 1] = c
        end
      end
    end
  end
  if #best == 0 then return nil end
  if #best == 1 then return best[1] end
  return best[(next_random() % #best) + 1]
end

local function avoided(r)
  local set = {{}}
  for host in string.gmatch(r.av, '[^\\n]+') do set[host] = true end
  return set
end

local function within_inflight_caps(r)
  local cap = tonumber(r.uc)
  if cap >= 0 and live(P .. 'userrun:' .. r.u) >= cap then return false end
  cap = tonumber(r.kc)
  if r.k ~= '' and cap >= 0 and live(P .. 'keyrun:' .. r.k) >= cap then return false end
  return true
end

-- A person's first waiting request in a band, dropping those whose replica stopped renewing them (gone
-- with it); nil once none is left, and the person leaves the band.
local function head(model, band, user)
  local line = line_key(model, band, user)
  while true do
    local id = redis.call('LINDEX', line, 0)
    if not id then
      redis.call('SREM', people_key(model, band), user)
      return nil
    end
    local r = record(id)
    if r and r.st == 'waiting' then return id, r end
    redis.call('LPOP', line)
  end
end

local function grant(id, r, c, model)
  -- The lease ends when the waiter's would have: a replica that died while its request waited holds the
  -- slot no longer than its waiter would have stayed.
  local at = now + math.max(redis.call('PTTL', P .. 'waiter:' .. id), 1)
  r.q = c.q
  for _, key in ipairs(grant_keys(r)) do hold(key, id, at) end
  local line = line_key(model, r.b, r.u)
  redis.call('LPOP', line)
  if redis.call('LLEN', line) == 0 then redis.call('SREM', people_key(model, r.b), r.u) end
  redis.call('ZREM', P .. 'userwait:' .. r.u, id)
  if r.k ~= '' then redis.call('ZREM', P .. 'keywait:' .. r.k, id) end
  -- Idle time is not saved up: a person's virtual time is at least the band's clock.
  local fair, band_clock, mine = vtimes(model, r.b, r.u)
  local start = math.max(mine, band_clock)
  local charged = cost_of(model)
  redis.call('HSET', fair, 'c' .. r.b, num(start), 'v' .. r.b .. ':' .. r.u, num(start + charged))
  redis.call('PEXPIRE', fair, HISTORY)
  local running = redis.call('ZCARD', P .. 'slots:' .. c.q .. ':' .. model)
  redis.call('HSET', P .. 'waiter:' .. id, 'st', 'granted', 'h', c.host, 'q', c.q, 'c', num(charged),
    'n', running)
  local message = table.concat({{id, c.host, num(charged), running, model}}, '\\n')
  redis.call('PUBLISH', P .. 'replica:' .. r.r, message)
end

-- fleet.scheduler's _dispatch and _next_waiter: while someone waits and a slot is free for them, grant it.
-- Interactive before batch; in a band, the person with the least slot-time received (then whoever's
-- first request came first), their oldest request first.
local function dispatch(model, candidates)
  while true do
    local chosen, host, stop = nil, nil, false
    for _, band in ipairs(BANDS) do
      local fair = fair_key(model)
      local band_clock = tonumber(redis.call('HGET', fair, 'c' .. band)) or 0
      local ranked = {{}}
      for _, user in ipairs(redis.call('SMEMBERS', people_key(model, band))) do
        local id, r = head(model, band, user)
        if id then
          local v = tonumber(redis.call('HGET', fair, 'v' .. band .. ':' .. user)) or band_clock
          ranked[#ranked + 1] = {{v = v, o = tonumber(r.o), id = id, r = r}}
        end
      end
      table.sort(ranked, function(a, b)
        if a.v ~= b.v then return a.v < b.v end
        return a.o < b.o
      end)
      for _, w in ipairs(ranked) do
        if within_inflight_caps(w.r) then
          local c = pick_host(model, candidates, avoided(w.r))
          if c then
            chosen, host = w, c
            break
          end
          -- No slot for this request means none for anyone's (same model), unless it avoids a host.
          if w.r.av == '' then
            stop = true
            break
          end
        end
      end
      if chosen or stop then break end
    end
    if not chosen then break end
    grant(chosen.id, chosen.r, host, model)
  end
  if nobody_waits(model) then redis.call('ZREM', P .. 'queued', model) end
end

local function granted_reply(r) return {{'granted', r.h, r.c, r.n, r.m}} end
"""

# ARGV[4..]: id, replica, model, band, user, key ('' none), user and key in-flight caps, user and key
# waiting caps (-1: none), avoided hosts (one per line), then the candidates. The request joins its
# person's line and the queue is dispatched; then, if it still waits, its waiting caps are checked (it
# counts itself). Replies {'granted', host, charged, running, model}, {'refused', 'user'|'key'} or
# {'waiting'}; the model's cost last.
ENQUEUE = (
    _COMMON
    + """
local id, replica, model, band, user, key = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local user_waiting, key_waiting = tonumber(ARGV[12]), tonumber(ARGV[13])
local candidates = parse_candidates(15)
local at = now + lease
local waiter = P .. 'waiter:' .. id
redis.call('HSET', waiter, 'm', model, 'b', band, 'u', user, 'k', key, 'r', replica, 'o',
  redis.call('INCR', P .. 'order'), 'uc', ARGV[10], 'kc', ARGV[11], 'av', ARGV[14], 'st', 'waiting')
redis.call('PEXPIREAT', waiter, at)
local people = people_key(model, band)
if redis.call('SISMEMBER', people, user) == 0 then
  -- Starting to wait again: time spent idle is not saved up for a burst.
  local fair, band_clock, mine = vtimes(model, band, user)
  redis.call('HSET', fair, 'v' .. band .. ':' .. user, num(math.max(mine, band_clock)))
  redis.call('PEXPIRE', fair, HISTORY)
end
local line = line_key(model, band, user)
redis.call('RPUSH', line, id)
keep(line, at)
redis.call('SADD', people, user)
keep(people, at)
hold(P .. 'userwait:' .. user, id, at)
if key ~= '' then hold(P .. 'keywait:' .. key, id, at) end
redis.call('ZADD', P .. 'queued', 'GT', at, model)
keep(P .. 'queued', at)
dispatch(model, candidates)
local cost = num(cost_of(model))
local r = record(id)
if r.st == 'granted' then
  local reply = granted_reply(r)
  reply[#reply + 1] = cost
  return reply
end
if user_waiting >= 0 and live(P .. 'userwait:' .. user) > user_waiting then
  remove_waiter(id, r)
  return {'refused', 'user', cost}
end
if key ~= '' and key_waiting >= 0 and live(P .. 'keywait:' .. key) > key_waiting then
  remove_waiter(id, r)
  return {'refused', 'key', cost}
end
return {'waiting', cost}
"""
)

# ARGV[4]: id. A request that stops waiting (its client left, its time ran out): out of the queue, or, if
# its turn came in that instant, its grant ({'granted', host, charged, running, model}) for the caller to
# use or give back. {'gone'}: nothing known of it.
WITHDRAW = (
    _COMMON
    + """
local id = ARGV[4]
local r = record(id)
if not r then return {'gone'} end
if r.st == 'waiting' then
  remove_waiter(id, r)
  return {'removed'}
end
return granted_reply(r)
"""
)

# ARGV[4..]: id, model ('' if not known: then the grant's own), the slot-seconds used, the slot-seconds
# Ollama measured ('' if none), then the candidates. The slot is given back and the person's charge
# corrected; the next waiters are granted in the same step. Once nothing waits or runs for the model, its
# fair-share history goes. Replies the model's cost.
RELEASE = (
    _COMMON
    + """
local id, model, used, measured = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
local r = record(id)
if model == '' and r then model = r.m end
if r and r.st == 'granted' then
  for _, key in ipairs(grant_keys(r)) do
    redis.call('ZREM', key, id)
    live(key)  -- and the expired members with it: the key goes with its last live one
  end
  local fair, _, mine = vtimes(r.m, r.b, r.u)
  redis.call('HSET', fair, 'v' .. r.b .. ':' .. r.u, num(mine + used - tonumber(r.c)))
  redis.call('PEXPIRE', fair, HISTORY)
  redis.call('DEL', P .. 'waiter:' .. id)
end
if model == '' then return num(DEFAULT_COST) end
if measured ~= '' then learn_cost(model, tonumber(measured)) end
dispatch(model, parse_candidates(8))
if nobody_waits(model) and live(P .. 'modelrun:' .. model) == 0 then redis.call('DEL', fair_key(model)) end
return num(cost_of(model))
"""
)

# ARGV[4..]: model, then the candidates. Slots may have appeared: dispatch who can go.
DISPATCH = (
    _COMMON
    + """
dispatch(ARGV[4], parse_candidates(5))
return 1
"""
)

# ARGV[4..]: replica, then the ids of the requests it waits for or runs. The replica's heartbeat and the
# renewal of everything it holds, in one step. Replies the live replicas, and per id {'waiting'},
# {'granted', host, charged, running, model} (so a grant whose message was lost is learned here) or {'gone'}
# (expired, or lost with Redis's data: never brought back).
RENEW = (
    _COMMON
    + """
local at = now + lease
hold(P .. 'replicas', ARGV[4], at)
local replicas = live(P .. 'replicas')
local states = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local r = record(id)
  if not r then
    states[#states + 1] = {'gone'}
  else
    redis.call('PEXPIREAT', P .. 'waiter:' .. id, at)
    if r.st == 'waiting' then
      redis.call('ZADD', P .. 'userwait:' .. r.u, 'XX', at, id)
      keep(P .. 'userwait:' .. r.u, at)
      if r.k ~= '' then
        redis.call('ZADD', P .. 'keywait:' .. r.k, 'XX', at, id)
        keep(P .. 'keywait:' .. r.k, at)
      end
      keep(line_key(r.m, r.b, r.u), at)
      keep(people_key(r.m, r.b), at)
      redis.call('ZADD', P .. 'queued', 'GT', at, r.m)
      keep(P .. 'queued', at)
      states[#states + 1] = {'waiting'}
    else
      for _, key in ipairs(grant_keys(r)) do
        redis.call('ZADD', key, 'XX', at, id)
        keep(key, at)
      end
      states[#states + 1] = granted_reply(r)
    end
  end
end
return {replicas, states}
"""
)

# ARGV[4]: replica. It stops (its heartbeat goes at once rather than when it expires).
LEAVE = (
    _COMMON
    + """
redis.call('ZREM', P .. 'replicas', ARGV[4])
return 1
"""
)

# ARGV[4..]: groups of 7: id, host, quoted host, model, band, user, key ('' none). Requests this replica
# runs that Redis does not know: admitted from its local share while Redis did not answer, or whose record
# Redis lost (a restart without persistence). They run on their hosts whatever the slots, so they are
# recorded as granted and counted in their slots, to be renewed and released as any grant; the shared queue
# then hands out only what is really free. Charged nothing now: their release charges what they used.
# Replies how many.
ADOPT = (
    _COMMON
    + """
local at = now + lease
local adopted = 0
for i = 4, #ARGV, 7 do
  local id = ARGV[i]
  local r = {q = ARGV[i + 2], m = ARGV[i + 3], u = ARGV[i + 5], k = ARGV[i + 6]}
  local waiter = P .. 'waiter:' .. id
  redis.call('HSET', waiter, 'st', 'granted', 'h', ARGV[i + 1], 'q', r.q, 'm', r.m, 'b', ARGV[i + 4],
    'u', r.u, 'k', r.k, 'c', 0, 'n', 1)
  redis.call('PEXPIREAT', waiter, at)
  for _, key in ipairs(grant_keys(r)) do hold(key, id, at) end
  adopted = adopted + 1
end
return adopted
"""
)
