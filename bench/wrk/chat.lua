-- wrk script: POST a small, realistic chat completion with a bearer key.
-- The key comes from SLUICE_BENCH_KEY (set by `python -m bench.run`).
-- With SLUICE_BENCH_PAUSE_MS set, each connection waits a random pause of that mean (exponential, so
-- the connections' requests arrive like independent clients, not in lockstep bursts) before every
-- request: 100 connections with a 100 ms mean pause offer about 1,000 requests/s, whatever the latency.
local key = os.getenv("SLUICE_BENCH_KEY") or "sk-bench"
local pause = tonumber(os.getenv("SLUICE_BENCH_PAUSE_MS") or "")

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.body = '{"model":"bench-model","messages":['
  .. '{"role":"system","content":"You are a concise assistant for a river conservation charity."},'
  .. '{"role":"user","content":"In one sentence, why do rivers meander across flat valleys?"}],'
  .. '"max_tokens":64,"temperature":0.7}'

if pause then
  math.randomseed(os.time())
  function delay()
    return math.floor(-pause * math.log(1 - math.random()) + 0.5)
  end
end
