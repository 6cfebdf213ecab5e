// Bulkhead service graph (/graph): draws /api/v1/graph with the vendored Cytoscape.js,
// or a sortable table when the answer is too large to draw. Every string from the
// server (names, labels, namespaces) is attacker-controlled: it only ever reaches the
// page as textContent or as Cytoscape data, never as HTML.
//
// Hooks for browser tests: the container gets data-ready="true" once the graph (or
// its table) is on screen, and window.bulkheadGraph is the Cytoscape instance.
// data-layout-ms / data-render-ms / data-fetch-ms record how long each step took.
"use strict";

(function () {
  // Leaves above this many nodes get a grouped grid (linear time) instead of the
  // force-directed "cose" layout (quadratic per iteration).
  const COSE_MAX_NODES = 80;
  // Above this many edges: straight "haystack" edges, no label rendering while panning.
  const BIG_EDGES = 2000;
  const MODES = ["learn", "monitor", "enforce"];
  const VERDICTS = ["allowed", "audit", "denied", "nopolicy"];
  const VERDICT_TEXT = { allowed: "allowed", audit: "audit", denied: "denied", nopolicy: "no policy" };
  const BASIS_TEXT = {
    events: "reported by enforcers in this range",
    policy: "from the policy in force (no events reported)",
    none: "no policy covers it",
  };

  // === small DOM helpers (text only) ===

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // Only same-site paths the server built (never "javascript:" or another origin).
  function safeHref(h) {
    return typeof h === "string" && h.startsWith("/") && !h.startsWith("//") && !h.startsWith("/\\") ? h : null;
  }

  function link(href, text) {
    const h = safeHref(href);
    if (!h) return el("span", null, text);
    const a = el("a", null, text);
    a.href = h;
    return a;
  }

  function badge(kind, value, text) {
    return el("span", "badge " + kind + "-" + value, text === undefined ? value : text);
  }

  function verdictBadge(v) {
    const ok = VERDICTS.includes(v) ? v : "nopolicy";
    return badge("verdict", ok, VERDICT_TEXT[ok]);
  }

  function fmtTime(ms) {
    if (typeof ms !== "number") return "–";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "–";
    const units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let v = n;
    let u = 0;
    while (v >= 1000 && u + 1 < units.length) {
      v /= 1000;
      u += 1;
    }
    return (u === 0 ? String(v) : v.toFixed(1)) + " " + units[u];
  }

  function dl(pairs) {
    const d = el("dl", "facts");
    for (const [k, v] of pairs) {
      if (v === undefined || v === null || v === "") continue;
      d.append(el("dt", null, k));
      const dd = el("dd");
      if (v instanceof Node) dd.append(v);
      else dd.textContent = String(v);
      d.append(dd);
    }
    return d;
  }

  // === sortable tables ===

  function cellValue(row, i, numeric) {
    const c = row.cells[i];
    if (!c) return numeric ? 0 : "";
    const raw = c.dataset.value !== undefined ? c.dataset.value : c.textContent.trim();
    return numeric ? Number(raw) || 0 : raw.toLowerCase();
  }

  function makeSortable(table) {
    const heads = table.tHead ? Array.from(table.tHead.rows[0].cells) : [];
    heads.forEach((th, i) => {
      const kind = th.dataset.sort;
      if (!kind) return;
      th.tabIndex = 0;
      th.classList.add("sortable-head");
      const sort = () => {
        const asc = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach((h) => h.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        const numeric = kind === "num";
        rows.sort((a, b) => {
          const x = cellValue(a, i, numeric);
          const y = cellValue(b, i, numeric);
          const c = x < y ? -1 : x > y ? 1 : 0;
          return asc ? c : -c;
        });
        body.append(...rows);
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          sort();
        }
      });
    });
  }

  document.querySelectorAll("table.sortable").forEach(makeSortable);

  // === the graph ===

  const container = document.getElementById("graph");
  if (!container || !container.dataset.src) return;
  const status = document.getElementById("graph-status");
  const panel = document.getElementById("graph-panel");
  const panelTitle = document.getElementById("graph-panel-title");
  const panelBody = document.getElementById("graph-panel-body");
  const rangeQuery = container.dataset.range || "";

  function setStatus(text) {
    if (status) status.textContent = text;
  }

  function drillHref(d) {
    if (!d || typeof d !== "object") return null;
    const p = new URLSearchParams();
    p.set("level", String(d.level));
    if (d.namespace !== undefined) p.set("namespace", String(d.namespace));
    if (d.workload !== undefined) p.set("workload", String(Number(d.workload)));
    return "/graph?" + p.toString() + (rangeQuery ? "&" + rangeQuery : "");
  }

  function cssColour(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function showPanel(title, body) {
    panelTitle.textContent = title;
    panelBody.replaceChildren(...body);
    panel.classList.remove("hidden");
  }

  function hidePanel() {
    panel.classList.add("hidden");
  }

  const closeButton = document.getElementById("graph-panel-close");
  if (closeButton) closeButton.addEventListener("click", hidePanel);

  function policyLink(ref) {
    if (!ref || typeof ref !== "object") return null;
    const id = Number(ref.proposal_id);
    if (!Number.isSafeInteger(id)) return null;
    return link("/proposals/" + id, "v" + Number(ref.version) + " (" + String(ref.status) + ")");
  }

  function nodePanel(n, cy) {
    const body = [];
    const kind = String(n.kind);
    const facts = [["Kind", kind]];
    if (n.identity !== undefined) facts.push(["Identity", Number(n.identity)]);
    if (n.namespace !== undefined) facts.push(["Namespace", n.namespace]);
    if (n.mode !== undefined && MODES.includes(n.mode)) facts.push(["Rollout mode", badge("mode", n.mode)]);
    if (n.workloads !== undefined) facts.push(["Workloads", Number(n.workloads)]);
    if (n.host !== undefined) facts.push(["Node", n.host]);
    if (Array.isArray(n.addresses) && n.addresses.length) facts.push(["Addresses", n.addresses.join(", ")]);
    const policy = policyLink(n.policy);
    facts.push(["Policy in force", policy || (kind === "workload" ? "none" : null)]);
    const proposal = policyLink(n.proposal);
    if (proposal) facts.push(["Latest proposal", proposal]);
    body.push(dl(facts));
    if (n.labels && typeof n.labels === "object") {
      const chips = el("div", "labels");
      for (const [k, v] of Object.entries(n.labels)) chips.append(el("span", "label-chip", k + "=" + v));
      if (chips.childElementCount) body.push(el("h3", null, "Labels"), chips);
    }
    // Traffic through the node, by class.
    const node = cy.getElementById(n.id);
    if (node && node.length) {
      const counts = {};
      node.connectedEdges().forEach((e) => {
        const v = e.data("verdict");
        counts[v] = (counts[v] || 0) + 1;
      });
      const line = el("p", "row");
      for (const v of VERDICTS) if (counts[v]) line.append(verdictBadge(v), el("span", null, String(counts[v])));
      if (line.childElementCount) body.push(el("h3", null, "Edges"), line);
    }
    const links = el("p", "row");
    const drill = drillHref(n.drill);
    if (drill) links.append(link(drill, n.drill.level === "endpoint" ? "Show its endpoints" : "Show its workloads"));
    if (safeHref(n.flows_href)) links.append(link(n.flows_href, "Flows"));
    if (n.identity !== undefined && kind === "workload") links.append(link("/rollout#identity-" + Number(n.identity), "Rollout"));
    if (links.childElementCount) body.push(links);
    showPanel(String(n.label), body);
  }

  function edgePanel(e, byId) {
    const src = byId.get(e.source);
    const dst = byId.get(e.target);
    const body = [];
    const v = el("p", "row");
    v.append(verdictBadge(e.verdict), el("span", "muted", BASIS_TEXT[e.basis] || ""));
    body.push(v);
    body.push(
      dl([
        ["Connections", Number(e.connections)],
        ["Bytes", fmtBytes(e.bytes)],
        ["Service-graph edges", Number(e.edges)],
        ["Ports", Number(e.port_count)],
        ["First seen", e.first_seen_ms !== undefined ? fmtTime(e.first_seen_ms) : null],
        ["Last seen", e.last_seen_ms !== undefined ? fmtTime(e.last_seen_ms) : null],
        ["Audit events", Number(e.audit_events) || null],
        ["Denied events", Number(e.denied_events) || null],
      ]),
    );
    if (Array.isArray(e.ports) && e.ports.length) {
      const t = el("table", "compact");
      const head = t.createTHead().insertRow();
      for (const h of ["Port", "Connections", "Verdict"]) head.append(el("th", null, h));
      const tb = t.createTBody();
      for (const p of e.ports) {
        const r = tb.insertRow();
        r.append(el("td", "mono", Number(p.port) + "/" + String(p.protocol)));
        r.append(el("td", "num", Number(p.connections)));
        const c = el("td");
        c.append(verdictBadge(p.verdict));
        r.append(c);
      }
      body.push(t);
      if (e.port_count > e.ports.length) body.push(el("p", "hint", "and " + (e.port_count - e.ports.length) + " more ports"));
    }
    if (e.classes) {
      const line = el("p", "row");
      for (const k of VERDICTS) if (e.classes[k]) line.append(verdictBadge(k), el("span", null, String(e.classes[k]) + " port(s)"));
      body.push(line);
    }
    const links = el("p", "row");
    if (safeHref(e.flows_href)) links.append(link(e.flows_href, "Flows of this edge"));
    if (src && safeHref(src.flows_href)) links.append(link(src.flows_href, "Flows of " + src.label));
    if (links.childElementCount) body.push(links);
    showPanel((src ? src.label : e.source) + " → " + (dst ? dst.label : e.target), body);
  }

  // Linear-time layout for large graphs: each compound parent's leaves in a square
  // grid, the blocks packed in rows, the loose nodes (outside peers) last.
  function gridPositions(nodes) {
    const parents = new Set(nodes.filter((n) => n.parent).map((n) => n.parent));
    const groups = new Map();
    for (const n of nodes) {
      if (parents.has(n.id)) continue;
      const g = n.parent || "";
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(n);
    }
    const order = Array.from(groups.keys()).sort((a, b) => {
      if (a === "") return 1;
      if (b === "") return -1;
      return groups.get(b).length - groups.get(a).length || (a < b ? -1 : 1);
    });
    const spacing = 70;
    const gap = 140;
    const area = nodes.length * spacing * spacing;
    const maxWidth = Math.max(1200, Math.sqrt(area) * 1.6);
    const pos = {};
    let x = 0;
    let y = 0;
    let rowHeight = 0;
    for (const g of order) {
      const members = groups.get(g).sort((a, b) => (a.label < b.label ? -1 : a.label > b.label ? 1 : 0));
      const cols = Math.ceil(Math.sqrt(members.length));
      const rows = Math.ceil(members.length / cols);
      const w = cols * spacing;
      const h = rows * spacing;
      if (x > 0 && x + w > maxWidth) {
        x = 0;
        y += rowHeight + gap;
        rowHeight = 0;
      }
      members.forEach((n, i) => {
        pos[n.id] = { x: x + (i % cols) * spacing, y: y + Math.floor(i / cols) * spacing };
      });
      x += w + gap;
      rowHeight = Math.max(rowHeight, h);
    }
    return pos;
  }

  function colours() {
    return {
      allowed: cssColour("--allowed", "#1f8a4c"),
      audit: cssColour("--audit", "#c98500"),
      denied: cssColour("--denied", "#c62828"),
      nopolicy: cssColour("--nopolicy", "#8a94a6"),
    };
  }

  // Every rule here costs per element at start-up (measured at 1,000 nodes / 10,000
  // edges): colours come from element data rather than one selector per class, and a
  // big graph draws no edge labels or arrows (unreadable at that size; the side panel
  // names ports and direction).
  function style(big, hasLoops, hasPredicted) {
    const node = {
      label: "data(label)",
      "font-size": 10,
      "text-valign": "bottom",
      "text-margin-y": 3,
      "min-zoomed-font-size": 6,
      width: 18,
      height: 18,
      "background-color": "#2458c6",
      color: "#1c2330",
    };
    if (!big) Object.assign(node, { "text-wrap": "ellipsis", "text-max-width": 140 });
    const edge = {
      width: "data(w)",
      "line-color": "data(colour)",
      "curve-style": big ? "haystack" : "bezier",
    };
    if (big) {
      edge["haystack-radius"] = 0;
    } else {
      Object.assign(edge, {
        "target-arrow-shape": "triangle",
        "target-arrow-color": "data(colour)",
        "arrow-scale": 0.8,
        label: "data(label)",
        "font-size": 8,
        "text-rotation": "autorotate",
        "min-zoomed-font-size": 7,
        "text-background-color": "#ffffff",
        "text-background-opacity": 0.8,
        "text-background-padding": 1,
        opacity: 0.85,
      });
    }
    const s = [
      { selector: "node", style: node },
      { selector: 'node[kind = "namespace"]', style: { shape: "round-rectangle", width: 34, height: 26, "background-color": "#5d6778" } },
      { selector: 'node[kind = "reserved"], node[kind = "external"]', style: { shape: "diamond", "background-color": "#6b7280" } },
      { selector: 'node[kind = "endpoint"]', style: { shape: "ellipse", "background-color": "#3b7dd8" } },
      {
        selector: ":parent",
        style: {
          shape: "round-rectangle",
          "background-color": "#eef1f5",
          "background-opacity": 0.6,
          "border-width": 1,
          "border-color": "#b8c0cc",
          "text-valign": "top",
          "text-halign": "center",
          "font-weight": "bold",
          padding: 12,
        },
      },
      { selector: "edge", style: edge },
      { selector: ":selected", style: { "overlay-color": "#2458c6", "overlay-opacity": 0.25, "overlay-padding": 4 } },
    ];
    if (hasLoops) s.push({ selector: "edge:loop", style: { "curve-style": "bezier", "loop-direction": "-45deg", "loop-sweep": "-60deg" } });
    if (hasPredicted) s.push({ selector: 'edge[predicted = "yes"]', style: { "line-style": "dashed" } });
    return s;
  }

  // The table goes into the graph container itself, so the container (the tests' hook)
  // stays visible whichever way the graph is shown.
  function renderTable(data, byId) {
    const note = document.getElementById("graph-truncated");
    if (note) {
      const t = data.totals || {};
      note.textContent =
        "The graph has " + Number(t.nodes) + " nodes and " + Number(t.edges) +
        " edges, more than can be drawn: these are the busiest " + data.edges.length + " edges.";
      note.classList.remove("hidden");
    }
    const wrap = el("div", "table-wrap");
    const table = el("table", "sortable");
    table.id = "graph-table";
    const head = table.createTHead().insertRow();
    const cols = [
      ["From", "text"], ["To", "text"], ["Verdict", "text"], ["Ports", "text"],
      ["Connections", "num"], ["Bytes", "num"], ["Last seen (UTC)", "num"], ["Flows", null],
    ];
    for (const [label, kind] of cols) {
      const th = el("th", kind === "num" ? "num" : null, label);
      if (kind) th.dataset.sort = kind;
      head.append(th);
    }
    const body = table.createTBody();
    for (const e of data.edges) {
      const r = body.insertRow();
      const src = byId.get(e.source);
      const dst = byId.get(e.target);
      r.append(el("td", null, src ? src.label : e.source));
      r.append(el("td", null, dst ? dst.label : e.target));
      const v = el("td");
      v.dataset.value = String(e.verdict);
      v.append(verdictBadge(e.verdict));
      r.append(v);
      r.append(el("td", "mono", e.label));
      const c = el("td", "num", Number(e.connections));
      c.dataset.value = String(Number(e.connections));
      r.append(c);
      const b = el("td", "num", fmtBytes(e.bytes));
      b.dataset.value = String(Number(e.bytes));
      r.append(b);
      const t = el("td", null, e.last_seen_ms !== undefined ? fmtTime(e.last_seen_ms) : "–");
      t.dataset.value = String(Number(e.last_seen_ms) || 0);
      r.append(t);
      const f = el("td");
      if (safeHref(e.flows_href)) f.append(link(e.flows_href, "flows"));
      r.append(f);
    }
    wrap.append(table);
    container.classList.add("as-table");
    container.replaceChildren(wrap);
    makeSortable(table);
  }

  function draw(data, fetchMs) {
    const nodes = Array.isArray(data.nodes) ? data.nodes : [];
    const edges = Array.isArray(data.edges) ? data.edges : [];
    const byId = new Map(nodes.map((n) => [n.id, n]));
    const edgeById = new Map(edges.map((e) => [e.id, e]));
    container.dataset.fetchMs = String(Math.round(fetchMs));
    container.dataset.nodes = String(nodes.length);
    container.dataset.edges = String(edges.length);
    if (data.truncated) {
      renderTable(data, byId);
      container.dataset.mode = "table";
      container.dataset.ready = "true";
      window.bulkheadGraph = null;
      setStatus("Too large to draw: showing the busiest edges as a table.");
      return;
    }
    if (typeof window.cytoscape !== "function") {
      setStatus("The graph library did not load.");
      container.dataset.ready = "error";
      return;
    }
    const bigEdges = edges.length > BIG_EDGES;
    const parentIds = new Set(nodes.map((n) => n.parent).filter(Boolean));
    const leaves = nodes.filter((n) => !parentIds.has(n.id)).length;
    const useCose = leaves <= COSE_MAX_NODES;
    const positions = useCose ? null : gridPositions(nodes);
    const elements = [];
    for (const n of nodes) {
      const d = { id: n.id, label: String(n.label), kind: String(n.kind) };
      if (n.parent) d.parent = n.parent;
      const item = { group: "nodes", data: d };
      if (positions && positions[n.id]) item.position = positions[n.id];
      elements.push(item);
    }
    const palette = colours();
    let hasLoops = false;
    let hasPredicted = false;
    for (const e of edges) {
      const w = 1 + Math.min(5, Math.log10(1 + (Number(e.connections) || 0)));
      const verdict = VERDICTS.includes(e.verdict) ? e.verdict : "nopolicy";
      const predicted = e.basis === "policy" && verdict !== "allowed" ? "yes" : "no";
      hasLoops = hasLoops || e.source === e.target;
      hasPredicted = hasPredicted || predicted === "yes";
      elements.push({
        group: "edges",
        data: { id: e.id, source: e.source, target: e.target, verdict, colour: palette[verdict], label: String(e.label), w, predicted },
      });
    }
    const t0 = performance.now();
    const cy = window.cytoscape({
      container,
      elements,
      style: style(bigEdges, hasLoops, hasPredicted),
      layout: { name: "preset", fit: true, padding: 30 },
      minZoom: 0.02,
      maxZoom: 4,
      boxSelectionEnabled: false,
      textureOnViewport: nodes.length > 1000,
      hideEdgesOnViewport: bigEdges,
      hideLabelsOnViewport: bigEdges,
      pixelRatio: bigEdges ? 1 : "auto",
    });
    window.bulkheadGraph = cy;
    const finish = () => {
      const layoutMs = performance.now() - t0;
      container.dataset.layoutMs = String(Math.round(layoutMs));
      container.dataset.layout = useCose ? "cose" : "grid";
      cy.one("render", () => {
        window.requestAnimationFrame(() => {
          const renderMs = performance.now() - t0;
          container.dataset.renderMs = String(Math.round(renderMs));
          container.dataset.ready = "true";
          container.dataset.mode = "graph";
          setStatus(
            nodes.length + " nodes, " + edges.length + " edges" +
            (edges.length === 0 ? " — no traffic in this range" : "") +
            " · drawn in " + Math.round(renderMs) + " ms",
          );
        });
      });
      cy.resize();
      cy.fit(undefined, 30);
    };
    if (useCose && nodes.length > 1) {
      const layout = cy.layout({
        name: "cose",
        animate: false,
        randomize: true,
        nodeDimensionsIncludeLabels: true,
        idealEdgeLength: () => 90,
        nodeRepulsion: () => 12000,
        nodeOverlap: 8,
        componentSpacing: 60,
        padding: 30,
        numIter: 1000,
      });
      layout.one("layoutstop", finish);
      layout.run();
    } else {
      finish();
    }
    const fit = document.getElementById("graph-fit");
    if (fit) {
      fit.classList.remove("hidden");
      fit.addEventListener("click", () => cy.fit(undefined, 30));
    }
    cy.on("tap", "node", (ev) => {
      const n = byId.get(ev.target.id());
      if (n) nodePanel(n, cy);
    });
    cy.on("tap", "edge", (ev) => {
      const e = edgeById.get(ev.target.id());
      if (e) edgePanel(e, byId);
    });
    cy.on("tap", (ev) => {
      if (ev.target === cy) hidePanel();
    });
  }

  const started = performance.now();
  fetch(container.dataset.src, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then((r) => {
      if (!r.ok) {
        return r.json().then(
          (b) => Promise.reject(new Error((b && b.error) || "HTTP " + r.status)),
          () => Promise.reject(new Error("HTTP " + r.status)),
        );
      }
      return r.json();
    })
    .then((data) => draw(data, performance.now() - started))
    .catch((err) => {
      setStatus("Could not load the graph: " + err.message);
      container.dataset.ready = "error";
    });
})();
