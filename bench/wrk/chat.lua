-- wrk script: POST a small, realistic chat completion with a bearer key.
-- The key comes from SLUICE_BENCH_KEY (set by `python -m bench.run`).
local key = os.getenv("SLUICE_BENCH_KEY") or "sk-bench"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
wrk.body = '{"model":"bench-model","messages":['
  .. '{"role":"system","content":"You are a concise assistant for a river conservation charity."},'
  .. '{"role":"user","content":"In one sentence, why do rivers meander across flat valleys?"}],'
  .. '"max_tokens":64,"temperature":0.7}'
