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
* `qe_group_create(stream, group, id, entries_read)`: XGROUP CREATE ... MKSTREAM
  after the same group check; `BUSYGROUP` is returned, not raised.
* `qe_count_after(stream, id, bound)` (read-only, FCALL_RO): entries after `id`,
  counted inside Redis up to `bound` (consumer lag, docs/runtime.md rule 7).
* `qe_version()`: the library's version, so a daemon can tell an old library.

Group ownership is written in the ACL file itself: user `qe-<daemon>` may
`STRLEN` the (never created) key `qe:group:<its group>`, no other user has `STRLEN`
on anything, and the functions ask Redis whether the caller may (`acl_check_cmd`). Redis ACLs
cannot restrict a group name in a command sent directly (XREADGROUP, XACK, XCLAIM
take the group as an argument, not a key), so a client that bypasses the runtime
and sends XACK itself with another daemon's group on a stream it also consumes is
not stopped by Redis: see docs/security.md, "What Redis cannot enforce".
"""

from __future__ import annotations

import redis

LIBRARY_NAME = "qe"
VERSION = "2"  # 2: the archive guard (XADDG)
GROUP_KEY = "qe:group:{group}"  # ACL marker of group ownership; never created
GROUP_CHECK_COMMAND = "strlen"  # granted on GROUP_KEY only, to the owner only

LIBRARY = r"""#!lua name=qe

local VERSION = '%(version)s'

-- Consumer-group commands never travel as ops: acks go through the checked path.
local GROUP_COMMANDS = {
  XACK = true, XCLAIM = true, XAUTOCLAIM = true, XGROUP = true, XREADGROUP = true,
  XSETID = true, XTRIM = true,
}

-- The ACL grants STRLEN on qe:group:<group> to the group's owner and STRLEN on nothing
-- else to anyone (a broad read grant, like the operator's, includes no STRLEN).
local function owns_group(group)
  return redis.acl_check_cmd('STRLEN', 'qe:group:' .. group)
end

local function refuse(message)
  return redis.error_reply('NOPERM ' .. message)
end

-- ARGV[1] group, ARGV[2] consumer, ARGV[3] acks as JSON [[stream, [ids ascending]], ...],
-- ARGV[4] ops as JSON [[cmd, arg, ...], ...] (all strings, so no number loses
-- precision in Lua). "XADD?" is an XADD guarded by an optional SET NX dedupe
-- marker: [XADD?, marker key or '', ttl, stream, xadd args...]. Every acked id must
-- still be pending for this consumer (one XPENDING range per stream), otherwise
-- nothing at all is applied; so must every op be allowed to the caller.
-- The archive guard (docs/archive.md): trim only below archive:floor, the first id of
-- the oldest day not yet archived; no floor yet = nothing archived = no trim.
-- op: XADDG marker ttl stream MINID|MAXLEN threshold field value ...
local function guarded_xadd(op)
  local stream, kind, threshold = op[4], op[5], op[6]
  local args = {'XADD', stream}
  local floor = redis.call('GET', 'archive:floor')
  if floor then
    if kind == 'MINID' then
      local t_ms, t_seq = string.match(threshold, '^(%%d+)-(%%d+)$')
      local f_ms, f_seq = string.match(floor, '^(%%d+)-(%%d+)$')
      if tonumber(f_ms) < tonumber(t_ms) or (f_ms == t_ms and tonumber(f_seq) < tonumber(t_seq)) then
        threshold = floor
      end
      args[#args + 1] = 'MINID'; args[#args + 1] = '~'; args[#args + 1] = threshold
    else
      -- MAXLEN n: evict at most the excess over n, and only entries below the floor.
      local excess = redis.call('XLEN', stream) + 1 - tonumber(threshold)
      if excess > 0 then
        args[#args + 1] = 'MINID'; args[#args + 1] = '~'; args[#args + 1] = floor
        args[#args + 1] = 'LIMIT'; args[#args + 1] = tostring(excess)
      end
    end
  end
  args[#args + 1] = '*'
  for i = 7, #op do args[#args + 1] = op[i] end
  return args
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
    if name == 'XADD?' then
      if op[2] ~= '' and not redis.acl_check_cmd('SET', op[2], '1', 'NX', 'EX', op[3]) then
        return refuse('this user may not write the dedupe marker ' .. op[2])
      end
      if not redis.acl_check_cmd('XADD', unpack(op, 4)) then
        return refuse('this user may not append to ' .. op[4])
      end
    elseif name == 'XADDG' then
      -- [XADDG, marker or '', ttl, stream, MINID|MAXLEN, threshold, field, value, ...]
      if op[2] ~= '' and not redis.acl_check_cmd('SET', op[2], '1', 'NX', 'EX', op[3]) then
        return refuse('this user may not write the dedupe marker ' .. op[2])
      end
      if not (redis.acl_check_cmd('XADD', op[4], '*', 'f', 'v') and redis.acl_check_cmd('XLEN', op[4])
              and redis.acl_check_cmd('GET', 'archive:floor')) then
        return refuse('this user may not append to ' .. op[4] .. ' under the archive guard')
      end
    elseif GROUP_COMMANDS[name] then
      return refuse(name .. ' is not allowed as a commit op')
    elseif not redis.acl_check_cmd(unpack(op)) then
      return refuse('this user may not run ' .. name .. ' on ' .. tostring(op[2]))
    end
  end
  for _, ack in ipairs(acks) do
    local stream, ids = ack[1], ack[2]
    local owned = {}
    for _, row in ipairs(redis.call('XPENDING', stream, group, ids[1], ids[#ids], #ids + 100000, consumer)) do
      owned[row[1]] = true
    end
    for _, id in ipairs(ids) do
      if not owned[id] then return {'STOLEN', stream, id} end
    end
  end
  local results = {'OK'}
  for _, op in ipairs(ops) do
    if op[1] == 'XADD?' then
      if op[2] == '' or redis.call('SET', op[2], '1', 'NX', 'EX', op[3]) then
        results[#results + 1] = redis.call('XADD', unpack(op, 4))
      else
        results[#results + 1] = ''
      end
    elseif op[1] == 'XADDG' then
      if op[2] == '' or redis.call('SET', op[2], '1', 'NX', 'EX', op[3]) then
        results[#results + 1] = redis.call(unpack(guarded_xadd(op)))
      else
        results[#results + 1] = ''
      end
    else
      redis.call(unpack(op))
    end
  end
  for _, ack in ipairs(acks) do redis.call('XACK', ack[1], group, unpack(ack[2])) end
  return results
end

-- ARGV: stream, group, start id, entries-read ('' for none).
local function group_create(keys, args)
  local stream, group, id, entries_read = args[1], args[2], args[3], args[4]
  if not owns_group(group) then
    return refuse('this user may not use consumer group ' .. group)
  end
  local command = {'XGROUP', 'CREATE', stream, group, id, 'MKSTREAM'}
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

local function count_after(keys, args)
  return #redis.call('XRANGE', args[1], '(' .. args[2], '+', 'COUNT', tonumber(args[3]))
end

redis.register_function('qe_commit', commit)
redis.register_function('qe_group_create', group_create)
redis.register_function{function_name = 'qe_count_after', callback = count_after, flags = {'no-writes'}}
redis.register_function{function_name = 'qe_version', callback = function() return VERSION end, flags = {'no-writes'}}
""" % {"version": VERSION}


class FunctionsMissing(redis.ResponseError):
    """The `qe` library is not loaded (or is another version): an administrator must
    run `python -m qe.admin load-functions`. A ResponseError, so every caller that
    backs off on a Redis error does so here too (daemons started before the load)."""


def is_missing(error: BaseException) -> bool:
    """Whether a Redis error says the `qe` library (or one of its functions) is absent."""
    return "function not found" in str(error).lower()


def load(r: redis.Redis) -> str:
    """FUNCTION LOAD REPLACE the library (an administrative step: needs `function|load`).
    Returns the library name. Loaded functions persist in the AOF and RDB."""
    name = r.function_load(LIBRARY, replace=True)
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
