"""The status page at GET /: the cluster at a glance, in a browser, refreshed every 2 s.

One static HTML document with its CSS and a little JavaScript inline: no build
step, no files to install, nothing fetched from elsewhere. The page itself holds
no data and is served without an API key; its script reads `/gpu/list`,
`/cluster/members` and `/healthz` from the agent that served it, every 2 s.
With auth on, those calls need a key: the page has a field for it and keeps it
in the tab's sessionStorage (gone when the tab closes, never sent anywhere but
this agent).

It shows the GPUs grouped by node (holder, utilization, memory, temperature,
power, health and drain state each with its reason), the live allocations and
the queue this agent knows, the members with the leader and the address each
advertises, and the set-up warnings of `/healthz` (an API open beyond loopback
without auth, ...). Every time on the page is shown one way: UTC, to the
second. Every value is put into the page with `textContent`, never as HTML, so
names from the API cannot inject markup; a Content-Security-Policy allows only
this page's own inline script and style (by hash) and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import html
from functools import lru_cache

_STYLE = """
:root { color-scheme: light dark; --ok: #2e7d32; --warn: #b26a00; --bad: #c62828; --muted: #777; }
* { box-sizing: border-box; }
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 1rem; max-width: 1200px; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: baseline; justify-content: space-between; }
h1 { font-size: 1.3rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
#state { color: var(--muted); }
form { display: flex; gap: .4rem; }
input { font: inherit; padding: .2rem .4rem; min-width: 10rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #8884; white-space: nowrap; }
th { font-weight: 600; }
.healthy { color: var(--ok); } .degraded { color: var(--warn); } .unhealthy { color: var(--bad); font-weight: 600; }
.drained { color: var(--warn); font-style: italic; } .in-service { color: var(--muted); }
#warnings p { margin: .5rem 0; padding: .4rem .6rem; border-left: 4px solid var(--bad); background: #c6282818; }
.alive { color: var(--ok); } .suspect { color: var(--warn); } .dead, .left { color: var(--bad); }
.empty { color: var(--muted); font-style: italic; }
@media (max-width: 600px) {
  body { padding: .5rem; font-size: 14px; }
  th, td { padding: .25rem .3rem; }
  .wide { display: none; }
}
"""

_SCRIPT = """
"use strict";
const KEY = "gpu-orchestrator-api-key";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  return tr;
}
function table(headers, rows, wide) {
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  headers.forEach((h, i) => head.appendChild(el("th", h, wide.includes(i) ? "wide" : "")));
  const body = t.createTBody();
  for (const r of rows) {
    [...r.children].forEach((td, i) => { if (wide.includes(i)) td.classList.add("wide"); });
    body.appendChild(r);
  }
  const box = el("div", null, "scroll");
  box.appendChild(t);
  return box;
}
// One time format on the whole page: UTC, to the second ("2026-12-04 15:33:08 UTC").
function when(iso) {
  if (iso === null || iso === undefined) return "never";
  const t = new Date(iso);
  if (isNaN(t.getTime())) return String(iso);
  return t.toISOString().slice(0, 19).replace("T", " ") + " UTC";
}
function num(value, unit) {
  return value === null || value === undefined ? "?" : Math.round(value) + " " + unit;
}
// Health and drain are separate states, each with its reason: an unhealthy GPU is out
// because the hardware failed, a drained one because an operator said so.
function health(g) {
  let text = g.health;
  if (g.health_reasons && g.health_reasons.length) text += ": " + g.health_reasons.join("; ");
  if (g.health === "unhealthy" && g.healthy_again_at) text += " (until " + when(g.healthy_again_at) + ")";
  return text;
}
function drain(g) {
  if (!g.drained) return "in service";
  return "drained" + (g.drain_reason ? ": " + g.drain_reason : "");
}
function memory(g) {
  if (g.memory_used === null || g.memory_used === undefined) return "? / " + g.memory_total + " MiB";
  return g.memory_used + " / " + g.memory_total + " MiB";
}
function renderGpus(gpus, below) {
  const out = $("gpus");
  if (!below) out.replaceChildren();
  const byNode = new Map();
  for (const g of gpus) {
    if (!byNode.has(g.node)) byNode.set(g.node, []);
    byNode.get(g.node).push(g);
  }
  if (byNode.size === 0) out.appendChild(el("p", "No GPUs.", "empty"));
  for (const [node, list] of byNode) {
    const section = el("section");
    section.setAttribute("data-node", node);
    section.appendChild(el("h3", node + " (" + list.length + " GPU" + (list.length === 1 ? "" : "s") + ")"));
    const rows = list.map((g) => row([
      [g.index], [g.name], [g.allocated ? (g.allocated_to || "allocated") : "free"],
      [num(g.utilization, "%")], [memory(g)], [num(g.temperature, "\u00b0C")], [num(g.power_draw, "W")],
      [health(g), g.health], [drain(g), g.drained ? "drained" : "in-service"], [when(g.last_updated)], [g.uuid],
    ], {"data-gpu": node + "/" + g.index, "data-health": g.health, "data-drained": String(Boolean(g.drained))}));
    section.appendChild(table(
      ["GPU", "Model", "Held by", "Util", "Memory", "Temp", "Power", "Health", "Drain", "Updated", "UUID"],
      rows, [1, 9, 10]));
    out.appendChild(section);
  }
}
function renderList(id, items, headers, cells, wide, empty) {
  const out = $(id);
  out.replaceChildren();
  if (items.length === 0) { out.appendChild(el("p", empty, "empty")); return; }
  out.appendChild(table(headers, items.map(cells), wide));
}
async function get(path) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-API-Key"] = key;
  const response = await fetch(path, {headers, cache: "no-store"});
  if (response.status === 401) throw new Error("an API key is needed (auth is on): enter it above");
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}
function renderWarnings(health) {
  const out = $("warnings");
  out.replaceChildren();
  for (const w of health.warnings || []) out.appendChild(el("p", "Warning: " + w, "warning"));
}
// Past this many nodes the page shows counts per node, and one node's GPUs when its row is clicked.
const DETAIL_MAX_NODES = 50;
let focus = null;
function renderNodes(summary) {
  const out = $("gpus");
  out.replaceChildren();
  const t = summary.summary;
  out.appendChild(el("p", t.gpus + " GPUs on " + t.nodes + " nodes, " + t.allocated + " leased, " + t.unhealthy +
    " unhealthy, " + t.drained + " drained. Click a node for its GPUs."));
  const rows = summary.nodes.map((n) => {
    const r = row([[n.node], [n.gpus], [n.allocated], [n.unhealthy], [n.drained]], {"data-node": n.node});
    r.addEventListener("click", () => { focus = n.node; refresh(); });
    return r;
  });
  out.appendChild(table(["Node", "GPUs", "Leased", "Unhealthy", "Drained"], rows, []));
}
async function refresh() {
  try {
    const summary = await get("/gpu/status?summary=true");
    const big = summary.summary.nodes > DETAIL_MAX_NODES;
    const [list, members, health] = await Promise.all([
      get(big ? "/gpu/list?limit=200" + (focus ? "&node=" + encodeURIComponent(focus) : "") : "/gpu/list"),
      get("/cluster/members"), get("/healthz")]);
    renderWarnings(health);
    if (big) {
      renderNodes(summary);
      if (focus) renderGpus(list.gpus, true);
    } else {
      renderGpus(list.gpus);
    }
    renderList("allocations", list.allocations, ["Allocation", "Service", "Node", "GPUs", "Since", "Expires"],
      (a) => row([[a.allocation_id], [a.service_name], [a.node], [a.gpu_ids.join(", ")], [when(a.allocated_at)],
                  [when(a.expires_at)]], {"data-allocation": a.allocation_id}), [4], "No allocations on this agent.");
    renderList("queue", list.queue, ["#", "Request", "Service", "Priority", "GPUs", "Waiting since"],
      (q) => row([[q.position], [q.request_id], [q.service_name], [q.priority],
                  [!q.requirements ? "?" : q.requirements.nodes ? q.requirements.nodes + "x" + q.requirements.gpus_per_node
                                                   : q.requirements.gpu_count], [when(q.submitted_at)]],
                 {"data-request": q.request_id}),
      [5], "The queue is empty.");
    const leaders = members.members.filter((m) => m.leader).map((m) => m.name);
    $("leader").textContent = leaders.join(", ") || "none";
    renderList("members", members.members, ["Member", "Status", "Role", "GPUs", "HTTP", "Version"],
      (m) => row([[m.name + (m.self ? " (this agent)" : "") + (m.leader ? " \u2605" : "")], [m.status, m.status],
                  [m.role || "?"], [m.gpus], [(m.addresses && m.addresses.http) || ""], [m.version || ""]],
                 {"data-member": m.name}), [4, 5], "No members.");
    $("state").textContent = "updated " + when(new Date().toISOString());
  } catch (error) {
    $("state").textContent = String(error.message || error);
  }
}
$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("key").value = "";
  refresh();
});
refresh();
setInterval(refresh, 2000);
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gpu-orchestrator: {node}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>gpu-orchestrator <small>&middot; {node}</small></h1>
<form id="keyform"><input id="key" type="password" placeholder="API key (if auth is on)"
 autocomplete="off" aria-label="API key"><button>Use key</button></form>
</header>
<div id="warnings"></div>
<p>Leader: <strong id="leader">&hellip;</strong> &middot; <span id="state">loading&hellip;</span></p>
<h2>GPUs by node</h2>
<div id="gpus"></div>
<h2>Allocations</h2>
<div id="allocations"></div>
<h2>Queue</h2>
<div id="queue"></div>
<h2>Members</h2>
<div id="members"></div>
<script>{script}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=4)
def status_page_html(node: str) -> str:
    """The page for the agent named `node`."""
    return _PAGE.replace("{node}", html.escape(node)).replace("{style}", _STYLE).replace("{script}", _SCRIPT)
