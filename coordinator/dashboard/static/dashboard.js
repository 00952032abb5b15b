// The coordinator's dashboard: polls GET /v1/dashboard and draws it. Every value from the server goes
// into the page as text (textContent), never as markup: node ids, messages and hold reasons are
// whatever their authors typed.
"use strict";

const REFRESH_MS = 4000;
const TOKEN_KEY = "cachepoint.token";
let fetchedAt = 0; // performance.now() of the last good snapshot: ages grow from there
let lastGood = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "age") el.dataset.age = String(value);
    else if (key === "width") el.style.width = value; // CSSOM: the CSP refuses style attributes
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function ago(seconds) {
  if (seconds < 1) return "now";
  if (seconds < 60) return Math.floor(seconds) + " s ago";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
  return Math.floor(seconds / 86400) + " d ago";
}

// An age element: seconds old when the snapshot was made; tick() keeps it current between polls.
function age(seconds) {
  return h("span", { class: "age", age: seconds, title: new Date(Date.now() - seconds * 1000).toLocaleString() },
    ago(seconds));
}
function ageOfNs(snapshot, ns) { return age(Math.max(snapshot.generated_ns - ns, 0) / 1e9); }

function tick() {
  const since = fetchedAt ? (performance.now() - fetchedAt) / 1000 : 0;
  for (const el of document.querySelectorAll(".age")) el.textContent = ago(Number(el.dataset.age) + since);
  const updated = document.getElementById("updated");
  if (lastGood) updated.textContent = "updated " + ago(since);
  document.getElementById("pulse").classList.toggle("stale", since > 3 * REFRESH_MS / 1000);
}

function stat(label, value, tone) {
  return h("div", { class: "stat " + (tone || ""), "data-stat": label },
    h("div", { class: "value" }, value),
    h("div", { class: "label" }, label));
}

function drawTotals(s) {
  const t = s.totals;
  const moved = t.wan_bytes + t.site_bytes;
  const share = moved ? Math.round((100 * t.site_bytes) / moved) + "%" : "–";
  document.getElementById("totals").replaceChildren(
    stat("nodes", t.nodes),
    stat("online", t.online, t.online ? "ok" : ""),
    stat("lagging", t.lagging, t.lagging ? "warn" : ""),
    stat("offline", t.offline, t.offline ? "bad" : ""),
    stat("sites", t.sites),
    stat("layers", t.layers),
    stat("versions", t.versions_made),
    stat("site bytes", bytes(t.site_bytes)),
    stat("WAN bytes", bytes(t.wan_bytes)),
    stat("site share", share, moved ? "ok" : ""),
    stat("outbox", t.outbox_depth, t.outbox_depth ? "warn" : ""),
    stat("holds", t.holds, t.holds ? "bad" : ""),
  );
  const c = s.coordinator;
  document.getElementById("coordinator").textContent =
    `coordinator ${c.software} · up ${ago(c.uptime_s).replace(" ago", "")} · served ${bytes(c.served_bytes)}`;
}

function trafficBar(siteBytes, wanBytes) {
  const total = siteBytes + wanBytes;
  const sitePct = total ? (100 * siteBytes) / total : 0;
  return h("div", { class: "bar", title: `site ${bytes(siteBytes)} · WAN ${bytes(wanBytes)}` },
    h("div", { class: "site-part", width: `${sitePct}%` }),
    h("div", { class: "wan-part", width: `${total ? 100 - sitePct : 0}%` }));
}

function nodeRow(n) {
  const held = n.held.length ? n.held.map((ref) => h("span", { class: "chip" }, ref)) : h("span", { class: "addr" }, "none");
  const pulling = n.pulling.map((ref) => h("span", { class: "chip pulling", title: "pulling now" }, ref + " ⇣"));
  const subs = n.subscriptions.map((sub) =>
    h("div", { class: "addr" }, `${sub.ref} → @${sub.wanted || "?"}`, sub.lag ? h("span", { class: "lag" }, ` ${sub.lag} behind`) : ""));
  return h("tr", { class: n.state, "data-node-id": n.node_id },
    h("td", {},
      h("span", { class: "dot " + n.state }), h("span", { class: "node-id" }, n.node_id),
      h("div", { class: "addr" }, n.address, n.software ? " · " + n.software : "")),
    h("td", {}, h("span", { class: "badge state-" + n.state }, n.state), h("div", { class: "addr" }, age(n.last_seen_s))),
    h("td", {}, held, pulling, subs),
    h("td", { class: "num" }, n.lag ? h("span", { class: "lag" }, n.lag) : "0"),
    h("td", { class: "num" }, bytes(n.site_bytes)),
    h("td", { class: "num" }, bytes(n.wan_bytes)),
    h("td", { class: "num" }, n.outbox_depth ? h("span", { class: "lag" }, n.outbox_depth) : "0"));
}

function drawSites(s) {
  const box = document.getElementById("sites");
  if (!s.sites.length) { box.replaceChildren(h("p", { class: "empty" }, "no node has registered yet")); return; }
  box.replaceChildren(...s.sites.map((site) =>
    h("div", { class: "site", "data-site": site.site },
      h("div", { class: "site-head" },
        h("h3", {}, site.site),
        h("div", { class: "facts" },
          h("span", {}, `${site.online}/${site.nodes.length} online`),
          h("span", {}, `site ${bytes(site.site_bytes)}`),
          h("span", {}, `WAN ${bytes(site.wan_bytes)}`),
          h("span", {}, `outbox ${site.outbox_depth}`)),
        trafficBar(site.site_bytes, site.wan_bytes)),
      h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "node"), h("th", {}, "seen"), h("th", {}, "versions held"),
          h("th", { class: "num" }, "lag"), h("th", { class: "num" }, "site"), h("th", { class: "num" }, "WAN"),
          h("th", { class: "num" }, "outbox"))),
        h("tbody", {}, site.nodes.map(nodeRow))))));
}

function drawLayers(s) {
  const box = document.getElementById("layers");
  if (!s.layers.length) { box.replaceChildren(h("p", { class: "empty" }, "no layer yet")); return; }
  const nodes = s.totals.nodes;
  const cards = s.layers.map((layer) => {
    const tagsAt = {};
    for (const [tag, number] of Object.entries(layer.tags)) (tagsAt[number] = tagsAt[number] || []).push(tag);
    const rows = layer.versions.map((v) =>
      h("tr", { "data-ref": `${layer.name}@${v.number}` },
        h("td", { class: "mono" }, "@" + v.number),
        h("td", {}, (tagsAt[v.number] || []).map((tag) => h("span", { class: "tag" }, tag))),
        h("td", { class: "msg", title: v.message }, v.message, h("span", { class: "addr" }, (v.message ? " · " : "") + "by " + v.author)),
        h("td", { class: "num" }, bytes(v.logical_bytes)),
        h("td", { class: "num" }, h("span", { class: "holders" + (nodes && v.holders === nodes ? " all" : "") },
          `${v.holders}/${nodes} nodes`)),
        h("td", { class: "num" }, ageOfNs(s, v.created_ns))));
    const promotions = layer.promotions.length
      ? h("ul", { class: "promotions" }, layer.promotions.map((m) =>
        h("li", {}, h("b", {}, m.tag), ` → @${m.version}`, m.previous ? ` (from @${m.previous})` : "",
          h("span", { class: "when" }, " by ", m.actor, " · ", ageOfNs(s, m.moved_ns)))))
      : null;
    return h("div", { class: "layer", "data-layer": layer.name },
      h("div", { class: "layer-head" },
        h("h3", {}, layer.name), h("span", { class: "kind" }, layer.kind),
        h("span", { class: "addr" }, `${layer.latest} version${layer.latest === 1 ? "" : "s"}`),
        Object.entries(layer.tags).map(([tag, n]) => h("span", { class: "tag" }, tag, h("span", { class: "at" }, "@" + n)))),
      h("table", { class: "versions" }, h("tbody", {}, rows)),
      promotions);
  });
  if (s.layers_total > s.layers.length) {
    cards.push(h("p", { class: "empty" }, `${s.layers_total - s.layers.length} more layers not shown`));
  }
  box.replaceChildren(...cards);
}

function drawHolds(s) {
  const box = document.getElementById("holds");
  if (!s.holds.length) { box.replaceChildren(h("p", { class: "empty" }, "none")); return; }
  box.replaceChildren(...s.holds.map((hold) =>
    h("div", { class: "hold" }, h("b", {}, hold.user), " — ", hold.reason,
      h("div", { class: "who" }, "set by ", hold.actor, " · ", ageOfNs(s, hold.set_ns)))));
}

function drawAudit(s) {
  const a = s.audit;
  const box = document.getElementById("audit");
  if (!a.seq) { box.replaceChildren(h("p", { class: "empty" }, "no record yet")); return; }
  box.replaceChildren(
    h("dl", { class: "kv" }, h("dt", {}, "records"), h("dd", {}, a.seq),
      h("dt", {}, "head hash"), h("dd", { class: "mono", title: a.hash }, a.hash.slice(0, 32) + "…")),
    ...a.recent.map((r) => h("div", { class: "audit-row" },
      h("span", { class: "seq" }, "#" + r.seq),
      h("span", {}, h("b", {}, r.action), " ", r.subject, h("span", { class: "addr" }, " by " + r.actor)),
      h("span", { class: "when" }, ageOfNs(s, r.time_ns)))));
}

function notice(text, askToken) {
  const box = document.getElementById("notice");
  box.hidden = !text;
  document.getElementById("notice-text").textContent = text || "";
  document.getElementById("token-form").hidden = !askToken;
}

async function refresh() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  try {
    const reply = await fetch("/v1/dashboard", { headers, cache: "no-store", credentials: "same-origin" });
    const body = await reply.json().catch(() => ({}));
    if (reply.status === 401) {
      if (token) sessionStorage.removeItem(TOKEN_KEY);
      notice(`Not authenticated: ${body.error || reply.statusText}`, true);
      return;
    }
    if (!reply.ok) { notice(`The coordinator answered ${reply.status}: ${body.error || reply.statusText}`, reply.status === 403); return; }
    notice("");
    lastGood = body;
    fetchedAt = performance.now();
    drawTotals(body); drawSites(body); drawLayers(body); drawHolds(body); drawAudit(body);
    document.body.dataset.generated = String(body.generated_ns);
    const pulse = document.getElementById("pulse");
    pulse.classList.remove("beat"); void pulse.offsetWidth; pulse.classList.add("beat");
  } catch (err) {
    notice(`The coordinator cannot be reached: ${err.message}`, false);
  } finally {
    tick();
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  document.getElementById("token").value = "";
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
setInterval(tick, 1000);
