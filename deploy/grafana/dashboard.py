# Makes deploy/grafana/nudge.json: python3 deploy/grafana/dashboard.py > deploy/grafana/nudge.json
# (the JSON is what ships; this is its source, easier to review than the JSON).
import json
R = "$__rate_interval"
panels = []
y = 0
pid = 1
def row(title):
    global y, pid
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    pid += 1; y += 1
x = 0
def panel(title, desc, targets, unit="short", kind="timeseries", w=8, h=8, extra=None):
    global x, y, pid
    if x + w > 24:
        x = 0; y += h
    p = {"type": kind, "title": title, "description": desc, "id": pid,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": h, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                     for i, (e, l) in enumerate(targets)]}
    if extra: p.update(extra)
    panels.append(p); pid += 1; x += w
def newrow(title):
    global x, y
    if x: y += 8
    x = 0
    row(title)
def q(p, metric, by="", sel=""):
    b = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({p}, sum by ({b}) (rate({metric}_bucket{sel}[{R}])))"

newrow("Ingest")
panel("Events by outcome", "Tracked events per second, gRPC and HTTP together: accepted, duplicate (an event id seen within the dedup horizon) or rejected.",
      [(f"sum by (outcome) (rate(nudge_events_total[{R}]))", "{{outcome}}")], "reqps")
panel("Accepted events by source and type", "Where events come from (grpc, http) and what they are.",
      [(f'sum by (source, type) (rate(nudge_events_total{{outcome="accepted"}}[{R}]))', "{{source}} {{type}}")], "reqps")
panel("Rejections by reason", "Refused input per second by RPC and reason (the FieldError reason the caller got).",
      [(f"sum by (rpc, reason) (rate(nudge_invalid_input_total[{R}]))", "{{rpc}} {{reason}}")], "reqps")
panel("Requests by RPC and status", "gRPC calls per second by method and status code.",
      [(f"sum by (rpc, code) (rate(nudge_grpc_requests_total[{R}]))", "{{rpc}} {{code}}")], "reqps")
panel("Shed requests", "Requests turned away before any work: overloaded, deadline, expired, queue_full.",
      [(f"sum by (reason) (rate(nudge_shed_total[{R}]))", "{{reason}}")], "reqps")
panel("Credentials refused", "Calls refused by key name and reason (missing, malformed, unknown, scope, rate_limited).",
      [(f"sum by (key, reason) (rate(nudge_auth_refused_total[{R}]))", "{{key}} {{reason}}")], "reqps")

newrow("Latency")
panel("Track acknowledgement latency", "From a Track call's arrival to its durable acknowledgement.",
      [(q(0.5, "nudge_grpc_request_duration_seconds", sel='{rpc="Track"}'), "p50"),
       (q(0.99, "nudge_grpc_request_duration_seconds", sel='{rpc="Track"}'), "p99")], "s")
panel("Event to trigger latency", "From receiving an event to its trigger committed to the outbox.",
      [(q(0.5, "nudge_trigger_latency_seconds"), "p50"), (q(0.99, "nudge_trigger_latency_seconds"), "p99")], "s")
panel("Per-stage latency (p99)", "Queue wait in a shard, a model's scoring call, the store's group commit (sync included), and how late timers fired.",
      [(q(0.99, "nudge_queue_wait_seconds"), "queue wait"),
       (q(0.99, "nudge_model_score_duration_seconds", by="model"), "score {{model}}"),
       (q(0.99, "nudge_store_commit_duration_seconds"), "store commit"),
       (q(0.99, "nudge_timer_lateness_seconds"), "timer lateness")], "s")
panel("RPC latency by method (p99)", "Each method's p99, to its status (a stream's is its whole life).",
      [(q(0.99, "nudge_grpc_request_duration_seconds", by="rpc"), "{{rpc}}")], "s")

newrow("Models")
panel("Score distribution", "How the models' probabilities are spread, by model: a shift is drift in the traffic or the model.",
      [(f"sum by (model, le) (rate(nudge_score_probability_bucket[{R}]))", "{{model}} {{le}}")], "short", "heatmap",
      extra={"options": {"calculate": False, "yAxis": {"unit": "percentunit"}}})
panel("Mean score", "The average probability each model gave.",
      [(f"sum by (model) (rate(nudge_score_probability_sum[{R}])) / sum by (model) (rate(nudge_score_probability_count[{R}]))", "{{model}}")], "percentunit")
panel("Models serving", "The served model versions (1 per model).",
      [("max by (name, version, format) (nudge_model_info)", "{{name}} {{version}} ({{format}})")], "short", "table",
      extra={"options": {"showHeader": True}})
panel("Model reloads and refusals", "Reloads by outcome and models refused at load by reason, over the last hour.",
      [("sum by (outcome) (increase(nudge_model_reloads_total[1h]))", "reload {{outcome}}"),
       ("sum by (reason) (increase(nudge_model_load_failures_total[1h]))", "refused {{reason}}")], "short")
panel("Scoring errors", "Scoring calls that failed, by model.",
      [(f"sum by (model) (rate(nudge_model_score_errors_total[{R}]))", "{{model}}")], "reqps")

newrow("Triggers")
panel("Trigger decisions by rule and outcome", "Delivered, held out (experiments), or the suppression reason.",
      [(f"sum by (rule, outcome) (rate(nudge_triggers_total[{R}]))", "{{rule}} {{outcome}}")], "reqps")
panel("Activation rate", "Triggers delivered per 1,000 accepted events.",
      [(f'1000 * sum(rate(nudge_triggers_total{{outcome="delivered"}}[{R}])) / sum(rate(nudge_events_total{{outcome="accepted"}}[{R}]))', "per 1,000 events")], "short")
panel("Suppressed by reason", "Trigger decisions that were not delivered, by reason (cooldown, frequency cap, quiet hours, exclusions).",
      [(f'sum by (outcome) (rate(nudge_triggers_total{{outcome!~"delivered|holdout"}}[{R}]))', "{{outcome}}")], "reqps")
panel("Experiment exposures and conversions", "Per rule and variant over the last day: exposures (delivered or held out) and conversions (purchases in the window).",
      [("sum by (rule, variant) (increase(nudge_experiment_exposures_total[1d]))", "exposed {{rule}} {{variant}}"),
       ("sum by (rule, variant) (increase(nudge_experiment_conversions_total[1d]))", "converted {{rule}} {{variant}}")], "short")
panel("Conversion rate by variant", "Conversions per exposure over the last day: the response rate, and the lift against the holdout.",
      [("sum by (rule, variant) (increase(nudge_experiment_conversions_total[1d])) / sum by (rule, variant) (increase(nudge_experiment_exposures_total[1d]))", "{{rule}} {{variant}}")], "percentunit")
panel("Rules running", "Rules loaded, and rules-file reloads by outcome over the last hour.",
      [("max(nudge_rules_loaded)", "rules"), ("sum by (outcome) (increase(nudge_rules_reloads_total[1h]))", "reload {{outcome}}")], "short")

newrow("Delivery")
panel("Webhook deliveries", "Attempts per second by endpoint and result: delivered, retried, dead_letter.",
      [(f"sum by (endpoint, result) (rate(nudge_webhook_deliveries_total[{R}]))", "{{endpoint}} {{result}}")], "reqps")
panel("Outbox depth", "Triggers each endpoint has not yet taken care of.",
      [("max by (endpoint) (nudge_outbox_depth)", "{{endpoint}}")], "short")
panel("Subscribers and timers", "Open SubscribeTriggers streams, pending timers, and timers firing per second.",
      [("sum(nudge_trigger_subscribers)", "subscribers"), ("sum(nudge_timers_pending)", "timers pending"),
       (f"sum(rate(nudge_timers_fired_total[{R}]))", "timers fired/s")], "short")

newrow("Store and memory")
panel("Cache", "Bytes the shards hold for people, against the budget (engine.cache_mb); people in memory.",
      [("sum(nudge_cache_bytes)", "held"), ("sum(nudge_cache_budget_bytes)", "budget")], "bytes")
panel("Cache hit ratio and evictions", "Profile and trigger-state lookups served from memory; people evicted per second.",
      [(f'sum(rate(nudge_cache_lookups_total{{result="hit"}}[{R}])) / sum(rate(nudge_cache_lookups_total[{R}]))', "hit ratio"),
       (f"sum(rate(nudge_cache_evictions_total[{R}]))", "evictions/s")], "short")
panel("Store faults and readiness", "Failed commits and store reopens, and why the server is not ready.",
      [(f"sum(rate(nudge_store_errors_total[{R}]))", "commit errors/s"),
       ("sum by (outcome) (increase(nudge_store_reopens_total[1h]))", "reopens {{outcome}}"),
       ("min(nudge_ready)", "ready"), ("max by (reason) (nudge_not_ready)", "not ready: {{reason}}")], "short")
panel("Panics and profiles", "Panics caught (each a defect) and the people with a profile in memory.",
      [("sum by (where) (increase(nudge_panics_total[1h]))", "panics {{where}}"), ("sum(nudge_profiles)", "profiles in memory")], "short")

dash = {
  "title": "Nudge", "uid": "nudge", "schemaVersion": 39, "version": 1, "editable": True,
  "tags": ["nudge"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
  "description": "Nudge: ingest, latency, models, triggers, delivery, store. Queries use only Nudge's own metrics; tests/integration/dashboard.rs runs each against a real Prometheus scraping a real Nudge.",
  "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "current": {}}]},
  "annotations": {"list": []},
  "panels": panels,
}
print(json.dumps(dash, indent=2))
