// Flows page: the "Live" toggle. While on, new flows matching the page's filter arrive
// as server-sent events from /flows/tail and are added to the top of the table.
// Every value is set with textContent (never as HTML): names and labels come from
// workloads and are attacker-controlled.
"use strict";

(() => {
  const table = document.getElementById("flows-table");
  const body = document.getElementById("flow-rows");
  const toggle = document.getElementById("live-toggle");
  const status = document.getElementById("live-status");
  if (!table || !body || !toggle || !status || !table.dataset.tail) {
    return;
  }
  // Rows kept in the table while live: older ones fall off the bottom.
  const MAX_ROWS = 1000;
  const VERDICT_CLASSES = new Set(["verdict-allowed", "verdict-audit", "verdict-denied", "verdict-nopolicy"]);
  const WORKLOAD_HREF = /^\/workloads\/[0-9]+$/;
  let source = null;
  let received = 0;

  function cell(row, text, className) {
    const td = document.createElement("td");
    if (className) {
      td.className = className;
    }
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function peerCell(row, peer, addr) {
    const td = document.createElement("td");
    if (peer.href && WORKLOAD_HREF.test(peer.href)) {
      const a = document.createElement("a");
      a.href = peer.href;
      a.textContent = peer.name;
      td.appendChild(a);
    } else {
      td.appendChild(document.createTextNode(peer.name));
    }
    const hint = document.createElement("div");
    hint.className = "hint mono";
    hint.textContent = addr;
    td.appendChild(hint);
    row.appendChild(td);
  }

  function rowOf(f) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(f.id);
    tr.className = "live-new";
    cell(tr, f.last_seen, "nowrap").title = "first seen " + f.first_seen;
    cell(tr, f.node, "mono");
    peerCell(tr, f.src, f.src_addr);
    peerCell(tr, f.dst, f.dst_addr);
    cell(tr, f.port + "/" + f.protocol, "mono");
    cell(tr, f.direction);
    const verdict = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = "badge " + (VERDICT_CLASSES.has(f.verdict_class) ? f.verdict_class : "verdict-nopolicy");
    badge.textContent = f.verdict;
    verdict.appendChild(badge);
    tr.appendChild(verdict);
    cell(tr, f.connections, "num");
    cell(tr, f.bytes, "num");
    cell(tr, f.process, "mono");
    return tr;
  }

  function say(text) {
    status.textContent = text;
  }

  function onFlows(event) {
    let batch;
    try {
      batch = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    const empty = document.getElementById("no-flows");
    if (empty) {
      empty.remove();
    }
    // Oldest first in the batch: each goes on top, so the newest ends up first.
    for (const f of batch.rows || []) {
      body.insertBefore(rowOf(f), body.firstChild);
      received += 1;
    }
    while (body.rows.length > MAX_ROWS) {
      body.deleteRow(body.rows.length - 1);
    }
    let text = "Live: " + received + " new flow" + (received === 1 ? "" : "s");
    if (batch.skipped > 0) {
      text += " (skipped " + batch.skipped + " while catching up)";
    }
    say(text);
  }

  function start() {
    received = 0;
    say("Live: waiting for new flows…");
    source = new EventSource(table.dataset.tail);
    source.addEventListener("flows", onFlows);
    source.addEventListener("ready", () => say("Live: waiting for new flows…"));
    source.onerror = () => {
      if (source && source.readyState === EventSource.CLOSED) {
        say("Live: disconnected.");
        toggle.checked = false;
        source = null;
      } else {
        say("Live: reconnecting…");
      }
    };
  }

  function stop() {
    if (source) {
      source.close();
      source = null;
    }
    say(received > 0 ? "Paused after " + received + " new flows." : "");
  }

  toggle.addEventListener("change", () => (toggle.checked ? start() : stop()));
  window.addEventListener("pagehide", stop);
})();
