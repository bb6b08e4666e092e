-- wrk script for the load test of `stream-learner serve` (tests/support/wrk.py runs it).
--
--   wrk ... -s wrk_infer.lua http://host:port/v2/models/<name>/infer -- <texts file> <output directory>
--
-- Each request is an Open Inference Protocol (V2) infer request of one text; the texts (one per line of
-- the texts file, each already a JSON string literal) are sent in rotation. The request's `id` is
-- "<text index>/<thread>/<request number>": the server echoes it, so each response says which text it
-- answers (wrk's response() is not told which request it belongs to). Every response is written, one
-- line "<status>\t<text index>\t<body>", to responses-<thread>.txt; at the end, done() writes wrk's own
-- counts and latency percentiles to summary.txt as "key value" lines.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

function init(args)
  texts = {}
  for line in io.lines(args[1]) do
    table.insert(texts, line)
  end
  assert(#texts > 0, "no texts in " .. args[1])
  out_dir = args[2]
  out = assert(io.open(out_dir .. "/responses-" .. thread_number .. ".txt", "w"))
  sent, written = 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  sent = sent + 1
  local index = (sent + thread_number) % #texts -- threads start at different texts
  local body = string.format(
    '{"id":"%d/%d/%d","inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":[%s]}]}',
    index, thread_number, sent, texts[index + 1]
  )
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  local index = body:match('"id":"(%d+)/') or ""
  out:write(status, "\t", index, "\t", (body:gsub("\n", " ")), "\n")
  written = written + 1
  out:flush() -- wrk ends its threads without closing their Lua states: nothing may stay buffered
end

function done(summary, latency, requests)
  local written_total = 0
  for _, thread in ipairs(threads) do
    written_total = written_total + thread:get("written")
  end
  local f = assert(io.open(threads[1]:get("out_dir") .. "/summary.txt", "w"))
  local e = summary.errors
  f:write(string.format("duration_us %d\nrequests %d\nbytes %d\n", summary.duration, summary.requests, summary.bytes))
  f:write(string.format("errors_connect %d\nerrors_read %d\nerrors_write %d\n", e.connect, e.read, e.write))
  f:write(string.format("errors_status %d\nerrors_timeout %d\n", e.status, e.timeout))
  f:write(string.format("responses_written %d\n", written_total))
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    f:write(string.format("latency_p%s_us %d\n", tostring(p), latency:percentile(p)))
  end
  f:write(string.format("latency_mean_us %.1f\nlatency_max_us %d\n", latency.mean, latency.max))
  f:close()
end
