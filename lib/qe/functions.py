"""The runtime's server-side code: one Redis FUNCTION library, `qe` (Redis >= 7.0).

Daemons never send Lua: their ACL users have `+fcall`/`+fcall_ro` and no `EVAL`,
`EVALSHA`, `SCRIPT` or `FUNCTION`, so nobody but the administrator can run code of
their own inside Redis (a busy loop would stall every client, and only `SCRIPT
KILL`/`FUNCTION KILL` could stop it). The library is loaded by an administrative
step, `python -m qe.admin load-functions` (the demo launcher, the test fixtures and
the install path run it; `qe-admin` is the only user allowed `FUNCTION LOAD`).

A function runs with the *caller's* ACL (Redis 7.0: every `redis.call` inside is
checked against the calling user's command and key permissions, exactly like a
command sent directly; tested in tests/test_acl.py). So the library grants nothing:
it only adds checks a plain command cannot make.

* `qe_commit(group, consumer, acks, ops)`: the atomic commit of a batch (SPEC 5,
  docs/runtime.md rule 4). Before applying anything it checks (`redis.acl_check_cmd`)
  that the caller may run every op and, when it acknowledges entries, that it owns
  `group` (below); a refused op therefore applies nothing (a Lua error after a write
  would leave that write in place). Ops may not be consumer-group commands (XACK,
  XCLAIM, XGROUP ...): acknowledgements go only through the checked `acks`.
* `qe_group_create(stream, group, id, entries_read)`: XGROUP CREATE ... MKSTREAM on the
  group's own delivery copy after the same group check; `BUSYGROUP` is returned, not
  raised; a group the fan-out table does not feed is refused.
* `qe_append(stream, group, field, value, ...)`: an append outside a commit (the
  operator's `qe dlq requeue`), fanned out like every other (to `group`'s copy only
  when given).
* `qe_count_after(stream, id, bound)` (read-only, FCALL_RO): entries after `id`,
  counted inside Redis up to `bound` (consumer lag, docs/runtime.md rule 7).
* `qe_version()`: the library's version, so a daemon can tell an old library.

Every append to a consumed stream is fanned out (`XADD?`/`XADDG` ops, `qe_append`) to
one delivery copy per consuming group, `<stream>@<group>` (qe.topology, whose table is
rendered into the library at load time), with the same id and fields; groups live
only on their copies, so the ACL, which restricts keys, keeps every group to its owner
even against direct commands (docs/security.md). Group ownership is also written in
the ACL file itself: user `qe-<daemon>` may `STRLEN` the (never created) key
`qe:group:<its group>`, no other user has `STRLEN` on anything, and the functions ask
Redis whether the caller may (`acl_check_cmd`).
"""

from __future__ import annotations

import json

import redis

from . import topology

LIBRARY_NAME = "qe"
VERSION = "3"  # 2: the archive guard (XADDG); 3: delivery copies per consuming group (qe.topology)

LIBRARY = r"""#!lua name=qe

local VERSION = '%(version)s'

-- Stream -> the consumer groups it is copied to (qe.topology, rendered at load time).
local FANOUT = %(fanout)s
local SEPARATOR = '%(separator)s'

-- Consumer-group commands never travel as ops: acks go through the checked path. A
-- plain XADD neither: every append goes through XADD?/XADDG, which fan it out.
local REFUSED_OPS = {
  XACK = true, XCLAIM = true, XAUTOCLAIM = true, XGROUP = true, XREADGROUP = true,
  XSETID = true, XTRIM = true, XADD = true,
}

-- The ACL grants STRLEN on qe:group:<group> to the group's owner and STRLEN on nothing
-- else to anyone (a broad read grant, like the operator's, includes no STRLEN).
local function owns_group(group)
  return redis.acl_check_cmd('STRLEN', 'qe:group:' .. group)
end

local function refuse(message)
  return redis.error_reply('NOPERM ' .. message)
end

local function copy_of(stream, group)
  return stream .. SEPARATOR .. group
end

local function consumes(stream, group)
  for _, g in ipairs(FANOUT[stream] or {}) do
    if g == group then return true end
  end
  return false
end

-- The trim rule of an append, checked before any write: MAXLEN takes a count, MINID an id.
local function valid_trim(kind, threshold)
  if kind == 'MAXLEN' then return string.match(threshold, '^%%d+$') ~= nil end
  if kind == 'MINID' then return string.match(threshold, '^%%d+%%-%%d+$') ~= nil end
  return false
end

local function id_below(a, b)
  local a_ms, a_seq = string.match(a, '^(%%d+)-(%%d+)$')
  local b_ms, b_seq = string.match(b, '^(%%d+)-(%%d+)$')
  return tonumber(a_ms) < tonumber(b_ms) or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
end

-- The trim arguments of an XADD to `key` (a stream or one of its copies) under the
-- stream's rule. The archive guard (docs/archive.md, `floor` = archive:floor or false):
-- trim only below the first id of the oldest day not yet archived; no floor yet =
-- nothing archived = no trim.
local function trim_args(key, kind, threshold, guarded, floor)
  if kind == nil then return {} end  -- qe_append: no trim
  if not guarded then return {kind, '~', threshold} end
  if not floor then return {} end
  if kind == 'MINID' then
    if id_below(floor, threshold) then threshold = floor end
    return {'MINID', '~', threshold}
  end
  -- MAXLEN n: evict at most the excess over n, and only entries below the floor.
  local excess = redis.call('XLEN', key) + 1 - tonumber(threshold)
  if excess > 0 then return {'MINID', '~', floor, 'LIMIT', tostring(excess)} end
  return {}
end

local function xadd_args(key, trim, id, op, first_field)
  local args = {'XADD', key}
  for _, arg in ipairs(trim) do args[#args + 1] = arg end
  args[#args + 1] = id
  for i = first_field, #op do args[#args + 1] = op[i] end
  return args
end

-- The entry just appended to `stream` as `id`, appended to every delivery copy (or to
-- `only_group`'s) with the same id and fields, trimmed like the stream. Nothing here
-- raises (a write already happened): a copy whose last id is at or past `id` (someone
-- appended to it directly) gets the entry under a new id; a copy that takes no entry
-- at all is returned, for the caller to report. Returns {copy, error, ...}.
local function fan_out(stream, id, kind, threshold, guarded, floor, op, first_field, only_group)
  local failed = {}
  for _, group in ipairs(FANOUT[stream] or {}) do
    if only_group == nil or only_group == group then
      local copy = copy_of(stream, group)
      local trim = trim_args(copy, kind, threshold, guarded, floor)
      local reply = redis.pcall(unpack(xadd_args(copy, trim, id, op, first_field)))
      if type(reply) == 'table' and reply.err then
        reply = redis.pcall(unpack(xadd_args(copy, trim, '*', op, first_field)))
      end
      if type(reply) == 'table' and reply.err then
        redis.log(redis.LOG_WARNING, 'qe: ' .. stream .. ' ' .. id .. ' not copied to ' .. copy .. ': ' .. reply.err)
        failed[#failed + 1] = copy
        failed[#failed + 1] = reply.err
      end
    end
  end
  return failed
end

-- Whether the caller may append to the stream and to each of its delivery copies
-- (with the archive guard, also read their lengths and the floor).
local function may_append(stream, guarded)
  local keys = {stream}
  for _, group in ipairs(FANOUT[stream] or {}) do keys[#keys + 1] = copy_of(stream, group) end
  for _, key in ipairs(keys) do
    if not redis.acl_check_cmd('XADD', key, '*', 'f', 'v') then return false, key end
    if guarded and not redis.acl_check_cmd('XLEN', key) then return false, key .. ' under the archive guard' end
  end
  if guarded and not redis.acl_check_cmd('GET', 'archive:floor') then return false, 'archive:floor' end
  return true, nil
end

-- ARGV[1] group, ARGV[2] consumer, ARGV[3] acks as JSON [[stream, [ids ascending]], ...],
-- ARGV[4] ops as JSON [[cmd, arg, ...], ...] (all strings, so no number loses
-- precision in Lua). Appends are guarded by an optional SET NX dedupe marker:
--   [XADD?, marker or '', ttl, stream, MINID|MAXLEN, '~', threshold, '*', field, value, ...]
--   [XADDG, marker or '', ttl, stream, MINID|MAXLEN, threshold, field, value, ...] (archive guard)
-- and fanned out to the stream's delivery copies. Acks name the stream; they apply to
-- the group's own copy. Every acked id must still be pending for this consumer (one
-- XPENDING range per stream), otherwise nothing at all is applied; so must every op be
-- allowed to the caller. Returns {'OK', id or '' per append, ...}, then, if a copy
-- took no entry, {'FANOUT_FAILED', copy, error, ...} last.
local function append_layout(name, op)
  if name == 'XADD?' then return op[5], op[7], false, 9 end
  return op[5], op[6], true, 7
end

local function commit(keys, args)
  local group, consumer = args[1], args[2]
  local acks = cjson.decode(args[3])
  local ops = cjson.decode(args[4])
  if #acks > 0 and not owns_group(group) then
    return refuse('this user may not use consumer group ' .. group)
  end
  for _, op in ipairs(ops) do
    local name = string.upper(op[1])
    if name == 'XADD?' or name == 'XADDG' then
      if op[2] ~= '' and not redis.acl_check_cmd('SET', op[2], '1', 'NX', 'EX', op[3]) then
        return refuse('this user may not write the dedupe marker ' .. op[2])
      end
      local kind, threshold, guarded, first_field = append_layout(name, op)
      if not valid_trim(kind, threshold) or (name == 'XADD?' and (op[6] ~= '~' or op[8] ~= '*'))
          or #op < first_field + 1 or (#op - first_field) %% 2 ~= 1 then
        return redis.error_reply('ERR malformed append op for ' .. tostring(op[4]))
      end
      local allowed, key = may_append(op[4], guarded)
      if not allowed then
        return refuse('this user may not append to ' .. key)
      end
    elseif REFUSED_OPS[name] then
      return refuse(name .. ' is not allowed as a commit op')
    elseif not redis.acl_check_cmd(unpack(op)) then
      return refuse('this user may not run ' .. name .. ' on ' .. tostring(op[2]))
    end
  end
  for _, ack in ipairs(acks) do
    local stream, ids = copy_of(ack[1], group), ack[2]
    local owned = {}
    for _, row in ipairs(redis.call('XPENDING', stream, group, ids[1], ids[#ids], #ids + 100000, consumer)) do
      owned[row[1]] = true
    end
    for _, id in ipairs(ids) do
      if not owned[id] then return {'STOLEN', stream, id} end
    end
  end
  local results = {'OK'}
  local failed = {'FANOUT_FAILED'}
  local floor = nil
  for _, op in ipairs(ops) do
    local name = string.upper(op[1])
    if name == 'XADD?' or name == 'XADDG' then
      if op[2] == '' or redis.call('SET', op[2], '1', 'NX', 'EX', op[3]) then
        local stream = op[4]
        local kind, threshold, guarded, first_field = append_layout(name, op)
        if guarded and floor == nil then floor = redis.call('GET', 'archive:floor') end
        local id = redis.call(unpack(xadd_args(stream, trim_args(stream, kind, threshold, guarded, floor), '*', op, first_field)))
        for _, item in ipairs(fan_out(stream, id, kind, threshold, guarded, floor, op, first_field, nil)) do
          failed[#failed + 1] = item
        end
        results[#results + 1] = id
      else
        results[#results + 1] = ''
      end
    else
      redis.call(unpack(op))
    end
  end
  for _, ack in ipairs(acks) do redis.call('XACK', copy_of(ack[1], group), group, unpack(ack[2])) end
  if #failed > 1 then results[#results + 1] = failed end
  return results
end

-- ARGV: stream, group, start id, entries-read ('' for none). The group is created on
-- its own delivery copy of the stream, which the fan-out must feed.
local function group_create(keys, args)
  local stream, group, id, entries_read = args[1], args[2], args[3], args[4]
  if not owns_group(group) then
    return refuse('this user may not use consumer group ' .. group)
  end
  if not consumes(stream, group) then
    return redis.error_reply('ERR no delivery copy of ' .. stream .. ' for group ' .. group ..
                             ' (qe.topology); reload the function library after changing it')
  end
  local command = {'XGROUP', 'CREATE', copy_of(stream, group), group, id, 'MKSTREAM'}
  if entries_read ~= nil and entries_read ~= '' then
    command[#command + 1] = 'ENTRIESREAD'
    command[#command + 1] = entries_read
  end
  local reply = redis.pcall(unpack(command))
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 9) == 'BUSYGROUP' then return 'BUSYGROUP' end
    return reply
  end
  return reply
end

-- ARGV: stream, group ('' = every consuming group), field, value, ... An append
-- outside a commit (the operator's `qe dlq requeue`: only the group that dead-lettered
-- the entry gets it again), fanned out like every other. Returns the new id.
local function append(keys, args)
  local stream, group = args[1], args[2]
  local allowed, key = may_append(stream, false)
  if not allowed then
    return refuse('this user may not append to ' .. key)
  end
  if #args < 4 or #args %% 2 ~= 0 then
    return redis.error_reply('ERR qe_append needs field value pairs')
  end
  if group ~= '' and not consumes(stream, group) then
    return redis.error_reply('ERR group ' .. group .. ' does not consume ' .. stream)
  end
  local id = redis.call(unpack(xadd_args(stream, {}, '*', args, 3)))
  local failed = fan_out(stream, id, nil, nil, false, nil, args, 3, group ~= '' and group or nil)
  if #failed > 0 then
    return redis.error_reply('ERR appended to ' .. stream .. ' as ' .. id .. ' but not to ' .. table.concat(failed, ' '))
  end
  return id
end

local function count_after(keys, args)
  return #redis.call('XRANGE', args[1], '(' .. args[2], '+', 'COUNT', tonumber(args[3]))
end

redis.register_function('qe_commit', commit)
redis.register_function('qe_group_create', group_create)
redis.register_function('qe_append', append)
redis.register_function{function_name = 'qe_count_after', callback = count_after, flags = {'no-writes'}}
redis.register_function{function_name = 'qe_version', callback = function() return VERSION end, flags = {'no-writes'}}
"""


def _lua_fanout(table: dict[str, tuple[str, ...]]) -> str:
    """The fan-out table as a Lua table literal (names are plain identifiers)."""
    rows = ", ".join(f"[{json.dumps(stream)}] = {{{', '.join(json.dumps(g) for g in groups)}}}"
                     for stream, groups in table.items())
    return "{" + rows + "}"


def library(consumes: dict[str, tuple[str, ...]] | None = None) -> str:
    """The library's source for a table of consumption (default: qe.topology's)."""
    return LIBRARY % {
        "version": VERSION, "fanout": _lua_fanout(topology.fanout(consumes)), "separator": topology.COPY_SEPARATOR,
    }


class FunctionsMissing(redis.ResponseError):
    """The `qe` library is not loaded (or is another version): an administrator must
    run `python -m qe.admin load-functions`. A ResponseError, so every caller that
    backs off on a Redis error does so here too (daemons started before the load)."""


def is_missing(error: BaseException) -> bool:
    """Whether a Redis error says the `qe` library (or one of its functions) is absent."""
    return "function not found" in str(error).lower()


def load(r: redis.Redis, consumes: dict[str, tuple[str, ...]] | None = None) -> str:
    """FUNCTION LOAD REPLACE the library (an administrative step: needs `function|load`).
    Returns the library name. Loaded functions persist in the AOF and RDB. `consumes`:
    another table of consumption than qe.topology's (tests with groups of their own)."""
    name = r.function_load(library(consumes), replace=True)
    return name.decode() if isinstance(name, bytes) else name


def loaded_version(r: redis.Redis) -> str | None:
    """The version of the loaded library, or None when it is not loaded."""
    try:
        version = r.fcall_ro("qe_version", 0)
    except redis.ResponseError as exc:
        if is_missing(exc):
            return None
        raise
    return version.decode() if isinstance(version, bytes) else version


def check(r: redis.Redis) -> None:
    """Raise FunctionsMissing unless this library's version is loaded."""
    version = loaded_version(r)
    if version != VERSION:
        found = "not loaded" if version is None else f"version {version} loaded, {VERSION} expected"
        raise FunctionsMissing(
            f"Redis function library {LIBRARY_NAME!r} {found}: run `python -m qe.admin load-functions` as qe-admin"
        )
