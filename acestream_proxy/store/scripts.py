"""
The Lua scripts of the Redis store.  Every multi-key change is one script, so
it costs one round trip and cannot be seen half done.
"""

# Only the lease holder may append: a stale owner (one that stood still past
# its lease) is refused, so its chunks cannot land after the new owner's.
#
# The chunk_added message is encoded by cjson, so that no worker id can break
# it.  Its time, ARGV[8], is the JSON number Python wrote, put in whole: cjson
# prints numbers with at most 14 significant digits, which would round a Unix
# time to 100 microseconds and print a whole second as an integer.
APPEND = """
if redis.call('GET', KEYS[3]) ~= ARGV[7] then return -1 end
local index = redis.call('INCR', KEYS[1])
redis.call('SET', ARGV[4] .. index, ARGV[1], 'PX', ARGV[2])
local old = index - tonumber(ARGV[3])
if old > 0 then redis.call('DEL', ARGV[4] .. old) end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local fields = cjson.encode({event = ARGV[5], worker_id = ARGV[7], index = index})
redis.call('PUBLISH', KEYS[2], '{"ts": ' .. ARGV[8] .. ', ' .. string.sub(fields, 2))
return index
"""

# Reads from the oldest chunk still in the window at or after ARGV[1]: chunks
# that left the window or expired are skipped, not counted against the limit,
# as the embedded buffer does.  One MGET per batch of at most 500 names keeps
# the work per chunk one command and the arguments within what unpack takes.
READ = """
local index = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[2])
local i = math.max(1, tonumber(ARGV[1]), index - tonumber(ARGV[3]) + 1)
local found = {}
while i <= index and #found < 2 * limit do
  local last = math.min(index, i + math.min(limit - #found / 2, 500) - 1)
  local names = {}
  for n = i, last do names[#names + 1] = ARGV[4] .. n end
  local values = redis.call('MGET', unpack(names))
  for n = 1, #names do
    if values[n] then
      found[#found + 1] = i + n - 1
      found[#found + 1] = values[n]
    end
  end
  i = last + 1
end
return found
"""

# KEYS[1] is the buffer index, ARGV[1] the chunk key prefix, ARGV[2] the
# window size: every chunk the window can hold goes with the index.
DELETE_CHUNKS = """
local index = tonumber(redis.call('GET', KEYS[1]) or '0')
for i = math.max(1, index - tonumber(ARGV[2]) + 1), index do
  redis.call('DEL', ARGV[1] .. i)
end
redis.call('DEL', KEYS[1])
"""

DELETE_BUFFER = DELETE_CHUNKS + "return 1\n"

# KEYS: buffer index, owner, metadata, clients, last disconnect time, HLS
# segments.
DELETE_STREAM = (
    DELETE_CHUNKS
    + """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('DEL', ARGV[3] .. id)
end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""
)

# An HLS segment's record: the list keeps the newest ARGV[2] and lives as
# long as the chunks it describes.
ADD_SEGMENT = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# Adding a client replaces its hash whole, as the embedded store does.
ADD_CLIENT = """
redis.call('SADD', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

UPDATE_CLIENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

REMOVE_CLIENT = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return redis.call('SCARD', KEYS[1])
"""

LIST_CLIENTS = """
local found = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(found, id)
  table.insert(found, redis.call('HGETALL', ARGV[1] .. id))
end
return found
"""

PUT_STREAM = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# Renewing the lease also keeps the stream's other keys alive.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The lease of a worker whose liveness key expired (it died, or lost Redis)
# goes to ARGV[2] at once, if it is still the dead worker's: a follower need
# not wait out a whole lease to take the stream over.  Like ACQUIRE, it says
# that the new owner runs.  KEYS: owner, the dead worker's liveness key, the
# new owner's.  ARGV: dead worker id, new owner id, lease ms, liveness ms.
TAKE_FROM_DEAD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[4])
return 1
"""

# Taking a free lease also says, in the same step, that its new owner runs:
# a worker that takes a stream (after Redis lost every key, say) must not
# look dead to the followers for a moment.  KEYS: owner, the worker's
# liveness key.  ARGV: worker id, lease ms, liveness ms.
ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 1
"""

# The keys of a stream that ended while Redis could not be reached, deleted
# once it is back: only if no other worker has taken the lease and no other
# session of the stream has been recorded meanwhile (ARGV[5]: the ended
# session's id, "" if it had none).  Those who listen are told it stopped
# (ARGV[6], the message), as an owner ending a stream tells them.
DELETE_ENDED = (
    """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[4] then return 0 end
local session = redis.call('HGET', KEYS[3], 'playback_session_id')
if session and session ~= ARGV[5] then return 0 end
"""
    + DELETE_CHUNKS
    + """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  redis.call('DEL', ARGV[3] .. id)
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('PUBLISH', KEYS[6], ARGV[6])
return 1
"""
)

# A write of the kind a Redis that cannot serve refuses (SET, which a full
# memory refuses as well as a replica), undone at once: whether Redis serves
# again.
PROBE = """
redis.call('SET', KEYS[1], '1', 'PX', 1000)
redis.call('DEL', KEYS[1])
return 1
"""
