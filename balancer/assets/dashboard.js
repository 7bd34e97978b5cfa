// The balancer's dashboard: polls /status every second and redraws. No framework, no
// external file. Everything that comes from Consul (service and instance names, addresses,
// check outputs) is inserted as text, never as markup.
"use strict";

const POLL_MS = 1000;
// Requests counted at the previous poll, per instance, to flash the rows that moved.
let previous = new Map();

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms ago`;
  if (seconds < 90) return `${seconds.toFixed(1)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function duration(seconds) {
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function clock(ms) {
  const d = new Date(ms);
  const pad = (n, w) => String(n).padStart(w, "0");
  return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
}

function sparkline(perSecond) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 22");
  svg.setAttribute("preserveAspectRatio", "none");
  const max = Math.max(1, ...perSecond);
  const offset = 60 - perSecond.length;
  perSecond.forEach((n, i) => {
    if (!n) return;
    const h = Math.max(1, (n / max) * 22);
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", String((offset + i) * 2));
    r.setAttribute("y", String(22 - h));
    r.setAttribute("width", "1.6");
    r.setAttribute("height", String(h));
    svg.appendChild(r);
  });
  const title = document.createElementNS(ns, "title");
  title.textContent = `requests per second, last ${perSecond.length} s`;
  svg.appendChild(title);
  return svg;
}

function cell(row, className, content) {
  const td = el("td", className);
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = String(content);
  row.appendChild(td);
  return td;
}

function instanceRow(service, inst, shareBase) {
  const tr = el("tr", "instance");
  const state = inst.ejected ? "ejected" : "passing";
  tr.dataset.id = inst.id;
  tr.dataset.state = state;
  cell(tr, "id", inst.id);
  cell(tr, "address wide", inst.address);
  cell(tr, "state", el("span", `pill ${state}`, state));
  const key = `${service}\u0000${inst.id}\u0000${inst.address}`;
  const before = previous.get(key);
  const req = cell(tr, "requests num", inst.requests);
  if (before !== undefined && inst.requests > before) {
    req.appendChild(el("span", "delta", `+${inst.requests - before}`));
    tr.classList.add("moved");
  }
  previous.set(key, inst.requests);
  const recent = inst.last_minute;
  const share = shareBase > 0 ? (100 * recent.requests) / shareBase : 0;
  const bar = el("span", "bar");
  const fill = el("span");
  // Through the CSSOM: the page's policy forbids inline style attributes.
  fill.style.width = `${share.toFixed(1)}%`;
  bar.appendChild(fill);
  const shareCell = cell(tr, "share", bar);
  shareCell.appendChild(document.createTextNode(`${Math.round(share)}%`));
  cell(tr, "rate num", `${recent.rate_per_second.toFixed(1)}/s`);
  cell(tr, "spark wide", sparkline(recent.per_second));
  const failures = cell(tr, "failures num", inst.failures);
  if (recent.failures > 0) failures.classList.add("bad-text");
  failures.title = `${recent.failures} in the last minute; ${inst.responses_5xx} 5xx answers; ejected ${inst.ejections} times`;
  return tr;
}

function goneRow(r) {
  const tr = el("tr", "instance gone");
  tr.dataset.id = r.id;
  tr.dataset.state = "gone";
  cell(tr, "id", r.id);
  cell(tr, "address wide", r.address);
  cell(tr, "state", el("span", "pill gone", "gone"));
  cell(tr, "requests num", r.requests);
  cell(tr, "share", `removed ${ago(r.age_seconds)}`).colSpan = 3;
  const failures = cell(tr, "failures num", r.failures);
  if (r.failures > 0) failures.classList.add("bad-text");
  return tr;
}

function serviceSection(s) {
  const sec = el("section", "service");
  sec.dataset.service = s.name;
  const h = el("h2", "", s.name + " ");
  h.appendChild(el("span", "routes", s.routes.join(" ")));
  sec.appendChild(h);

  const d = s.discovery;
  const line = el("p", "discovery");
  if (d.source === "consul") {
    line.appendChild(el("span", `pill ${d.stale ? "stale" : "live"}`, d.stale ? "STALE" : "live"));
    line.appendChild(document.createTextNode(
      ` last discovery update ${ago(d.last_change_age_seconds)} · Consul answered ` +
      `${ago(d.last_success_age_seconds)} · ${s.healthy_instances} in rotation`));
    line.title = "Consul answers a blocking query on a change, or after --watch-wait; " +
      `index ${d.index}, ${d.updates} updates applied`;
  } else {
    line.textContent = `static instances · ${s.healthy_instances} in rotation`;
  }
  sec.appendChild(line);
  if (d.stale) {
    const msg = `STALE: Consul has not answered for ${ago(d.last_success_age_seconds).replace(" ago", "")} ` +
      `(${d.consecutive_errors} failed queries in a row). Routing on the last known ` +
      `${s.healthy_instances} instances. ${d.last_error || ""}`;
    const b = el("p", "banner bad stale", msg);
    sec.appendChild(b);
  }

  const table = el("table", "instances");
  const head = el("tr");
  for (const [label, cls] of [["instance", ""], ["address", "wide"], ["state", ""],
    ["requests", "num"], ["share, 1 min", ""], ["rate, 1 min", "num"], ["last 60 s", "wide"],
    ["failures", "num"]]) {
    head.appendChild(el("th", cls, label));
  }
  table.appendChild(el("thead")).appendChild(head);
  const body = el("tbody");
  const base = s.instances.reduce((sum, i) => sum + i.last_minute.requests, 0);
  for (const inst of s.instances) body.appendChild(instanceRow(s.name, inst, base));
  for (const r of s.recently_removed) {
    if (!s.instances.some((i) => i.id === r.id && i.address === r.address)) body.appendChild(goneRow(r));
  }
  if (!s.instances.length && !s.recently_removed.length) {
    const tr = el("tr");
    cell(tr, "bad-text", "no healthy instance: requests get 503").colSpan = 8;
    body.appendChild(tr);
  }
  table.appendChild(body);
  const scroll = el("div", "scroll");
  scroll.appendChild(table);
  sec.appendChild(scroll);
  return sec;
}

function eventItem(e) {
  const li = el("li");
  const t = el("time", "", clock(e.at_ms));
  t.dateTime = new Date(e.at_ms).toISOString();
  li.appendChild(t);
  li.appendChild(el("span", `change ${e.change}`, e.change));
  if (e.instance) li.appendChild(el("span", "", `${e.instance} (${e.address})`));
  li.appendChild(el("span", "age", `${e.service} · ${ago(e.age_seconds)}`));
  return li;
}

function render(st) {
  const n = st.services.reduce((sum, s) => sum + s.instances.length, 0);
  document.getElementById("summary").textContent =
    `up ${duration(st.uptime_seconds)} · ${n} instance${n === 1 ? "" : "s"} in rotation · ` +
    `${st.connections} client connection${st.connections === 1 ? "" : "s"} · updated ${clock(st.now_ms).slice(0, 8)}` +
    (st.ready ? "" : " · waiting for the first discovery answer");
  const main = document.getElementById("services");
  main.replaceChildren(...st.services.map(serviceSection));
  const events = document.getElementById("events");
  events.replaceChildren(...st.events.map(eventItem));
  if (!st.events.length) events.appendChild(el("li", "age", "no change yet"));
}

async function poll() {
  const down = document.getElementById("down");
  try {
    const r = await fetch("/status", { cache: "no-store" });
    if (!r.ok) throw new Error(`/status answered ${r.status}`);
    render(await r.json());
    down.hidden = true;
  } catch (e) {
    down.textContent = `The balancer does not answer (${e.message}); showing what it said last.`;
    down.hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
