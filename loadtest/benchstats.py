"""loadtest/benchstats.py — the statistics of a serving benchmark, defined as
vLLM's `bench serve` defines them, so figures and JSON keys compare one to one.
Used by loadtest/load.py and tested by tests/integration/test_loadtest.py.

Pure functions over per-request records; standard library only.

Definitions (per completed request, times in seconds):
  TTFT   time from sending the request to the first streamed chunk that
         carries a choice (an SSE event whose "choices" list is not empty).
  ITL    the gaps between successive such chunks (all requests pooled).
  E2EL   time from sending the request to the end of the response.
  TPOT   (E2EL - TTFT) / (output_tokens - 1), only for requests with more
         than one output token; for goodput a request with <= 1 output token
         counts as TPOT 0 (vLLM's rule).
  request_throughput      completed / duration
  output_throughput       sum(output_tokens) / duration
  total_token_throughput  (sum(prompt_tokens) + sum(output_tokens)) / duration
  request_goodput         requests meeting every given SLO / duration
Percentiles interpolate linearly between order statistics (numpy's default),
median = 50th percentile, std is the population standard deviation. A metric
with no samples (no streaming, or nothing completed) is None, not 0.
"""
import math

# The vLLM summary keys this module fills, in vLLM's order.
METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(xs, p):
    """p-th percentile (0..100) of xs with linear interpolation; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    k = (len(s) - 1) * (p / 100.0)
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def mean(xs):
    return float(sum(xs)) / len(xs) if xs else None


def std(xs):
    """Population standard deviation (numpy.std's default, ddof=0)."""
    if not xs:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def tpot(rec):
    """TPOT of one completed request in seconds, or None when it has <= 1
    output token or no TTFT (not streamed)."""
    if rec.get("ttft") is None or rec["output_tokens"] <= 1:
        return None
    return (rec["e2el"] - rec["ttft"]) / (rec["output_tokens"] - 1)


def parse_slos(spec):
    """'ttft:200 tpot:50 e2el:1000' (milliseconds, vLLM's --goodput syntax, also
    comma separated) -> {'ttft': 0.2, ...} in seconds. Raises ValueError."""
    out = {}
    for item in spec.replace(",", " ").split() if spec else []:
        name, _, val = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput SLO '{name}': expected ttft, tpot or e2el")
        v = float(val)
        if not v > 0:
            raise ValueError(f"goodput SLO '{name}' must be a positive number of milliseconds")
        out[name] = v / 1000.0
    return out


def good_requests(recs, slos):
    """How many completed records meet every SLO (seconds); vLLM counts a
    request with <= 1 output token as TPOT 0."""
    n = 0
    for r in recs:
        vals = {"ttft": r.get("ttft"), "e2el": r["e2el"], "tpot": tpot(r) or 0.0}
        if all(vals[k] is not None and vals[k] <= lim for k, lim in slos.items()):
            n += 1
    return n


def summarize(recs, duration, slos=None, percentiles=(50, 90, 99)):
    """recs: completed requests, each a dict with prompt_tokens, output_tokens,
    ttft (s or None), itl (list of s), e2el (s). Returns vLLM's summary keys
    (durations in ms) plus p<P>_<metric>_ms for each requested percentile."""
    out_toks = sum(r["output_tokens"] for r in recs)
    in_toks = sum(r["prompt_tokens"] for r in recs)
    d = duration if duration and duration > 0 else None
    res = {
        "duration": duration,
        "completed": len(recs),
        "total_input_tokens": in_toks,
        "total_output_tokens": out_toks,
        "request_throughput": len(recs) / d if d else 0.0,
        "request_goodput": None,
        "output_throughput": out_toks / d if d else 0.0,
        "total_token_throughput": (in_toks + out_toks) / d if d else 0.0,
    }
    if slos:
        res["request_goodput"] = good_requests(recs, slos) / d if d else 0.0
    series = {
        "ttft": [r["ttft"] for r in recs if r.get("ttft") is not None],
        "tpot": [t for t in (tpot(r) for r in recs) if t is not None],
        "itl": [x for r in recs for x in r.get("itl") or ()],
        "e2el": [r["e2el"] for r in recs],
    }
    for m in METRICS:
        xs = series[m]
        ms = lambda v: v * 1000.0 if v is not None else None  # noqa: E731
        res[f"mean_{m}_ms"] = ms(mean(xs))
        res[f"median_{m}_ms"] = ms(percentile(xs, 50))
        res[f"std_{m}_ms"] = ms(std(xs))
        for p in percentiles:
            res[f"p{p:g}_{m}_ms"] = ms(percentile(xs, p))
    return res
