// The status page itself: one HTML document with inline CSS and a small inline script, no external assets (the
// printer may have no internet, and Mainsail shows it in an iframe). The first paint comes from the snapshot
// embedded as JSON; then the script follows /events (server-sent events) and re-renders. Every text is set with
// textContent, never as HTML: log lines and messages come from tools and devices.

const STYLE = `
:root{color-scheme:dark;--bg:#121212;--card:#1e1e1e;--line:#2c2c2c;--text:rgba(255,255,255,.87);--muted:rgba(255,255,255,.56);
--primary:#2196f3;--ok:#4caf50;--warn:#fb8c00;--err:#ff5252}
*{box-sizing:border-box}
html,body{margin:0;background:var(--bg);color:var(--text);font:14px/1.4 Roboto,"Segoe UI",system-ui,-apple-system,sans-serif}
body{padding:10px;max-width:820px;margin:0 auto}
body.stale main{opacity:.55}
header{display:flex;align-items:center;justify-content:space-between;gap:8px;margin-bottom:8px}
.brand{font-weight:500;font-size:15px;letter-spacing:.02em}
.brand small{color:var(--muted);font-weight:400;margin-left:4px}
.live{font-size:12px;color:var(--muted);white-space:nowrap}
.live::before{content:"";display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:5px;background:var(--ok);vertical-align:middle}
.live.retry::before{background:var(--warn)}
.live.down::before{background:var(--err)}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:8px}
.chip{display:inline-flex;align-items:center;gap:6px;background:var(--card);border:1px solid var(--line);border-radius:14px;padding:2px 10px;font-size:13px}
.dot{width:8px;height:8px;border-radius:50%;background:var(--muted)}
.dot.ok{background:var(--ok)}.dot.warn{background:var(--warn)}.dot.err{background:var(--err)}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:10px 12px;margin-bottom:8px}
h1{font-size:16px;font-weight:500;margin:0;flex:1;min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
h2{font-size:12px;font-weight:500;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);margin:0 0 6px}
.row{display:flex;align-items:center;gap:8px}
.badge{font-size:11px;font-weight:700;letter-spacing:.05em;text-transform:uppercase;background:var(--primary);color:#fff;border-radius:3px;padding:1px 6px}
.state{font-size:12px;color:var(--muted);white-space:nowrap}
.state.ok{color:var(--ok)}.state.err{color:var(--err)}.state.run{color:var(--primary)}
.stage{margin:6px 0;color:var(--text);overflow-wrap:anywhere}
.stage b{font-weight:500;color:var(--primary)}
.bar{height:10px;background:#2f2f2f;border-radius:5px;overflow:hidden}
.fill{height:100%;width:0;background:var(--primary);transition:width .25s linear}
.fill.ok{background:var(--ok)}.fill.err{background:var(--err)}
.pline{display:flex;justify-content:space-between;font-size:12px;color:var(--muted);margin-top:3px;font-variant-numeric:tabular-nums}
.result{margin-top:6px;overflow-wrap:anywhere}
.result.ok{color:var(--ok)}.result.err{color:var(--err)}
.muted{color:var(--muted)}
table{width:100%;border-collapse:collapse;margin-top:8px;font-size:13px}
td{padding:3px 4px;border-top:1px solid var(--line);vertical-align:top}
td.n{font-weight:500;width:30%;overflow-wrap:anywhere}
td.s{white-space:nowrap;width:1%;padding-right:12px}
td.s.flashed{color:var(--ok)}td.s.failed{color:var(--err)}td.s.flashing,td.s.building{color:var(--primary)}td.s.built,td.s.unknown{color:var(--muted)}
td.p{width:35%}
.mini{height:6px;background:#2f2f2f;border-radius:3px;overflow:hidden;margin-top:6px}
.mini>div{height:100%;background:var(--primary)}
ol{list-style:none;margin:0;padding:0}
.log{font:12px/1.45 ui-monospace,"DejaVu Sans Mono",Menlo,monospace;max-height:14em;overflow-y:auto}
.log li{white-space:pre-wrap;overflow-wrap:anywhere;padding:0 2px}
.log li time{color:var(--muted);margin-right:6px}
.log li.warn{color:var(--warn)}.log li.error{color:var(--err);background:rgba(255,82,82,.08)}
.history li{display:flex;gap:8px;padding:3px 0;border-top:1px solid var(--line);font-size:13px}
.history li:first-child{border-top:0}
.history time{color:var(--muted);white-space:nowrap;font-variant-numeric:tabular-nums}
.history .t{flex:1;min-width:0;overflow-wrap:anywhere}
.history .o{white-space:nowrap}
.history .o.ok{color:var(--ok)}.history .o.err{color:var(--err)}
.history .m{display:block;color:var(--muted);font-size:12px}
`;

// Plain ES2017 without template literals (it is embedded in one); the CSP allows exactly this script by its hash.
const SCRIPT = `
(function () {
  "use strict";
  var LOG_LINES = 40;
  var state = JSON.parse(document.getElementById("snapshot").textContent);
  var shownLog = null, shownHistory = null;

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
  function bytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }
  function amount(p) {
    if (!p) return "";
    if (p.unit === "bytes") return bytes(p.done) + " / " + bytes(p.total);
    if (p.unit === "percent") return "";
    return p.done + " / " + p.total + " " + p.unit;
  }
  function pad(n) { return n < 10 ? "0" + n : String(n); }
  function when(iso) {
    if (!iso) return "";
    var d = new Date(iso), now = new Date();
    var hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    if (d.toDateString() === now.toDateString()) return hm;
    return d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " + hm;
  }
  function clock(iso) { var d = new Date(iso); return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()); }
  var BOARD_STATES = { building: "building", built: "built, waiting", flashing: "flashing", flashed: "flashed", failed: "failed", unknown: "not confirmed" };

  function renderPrinter() {
    var p = state.printer, job = state.job, running = job && !job.result;
    var chips = $("printer");
    clear(chips);
    function chip(cls, text) { var c = el("span", "chip"); c.appendChild(el("i", "dot " + cls)); c.appendChild(document.createTextNode(text)); chips.appendChild(c); }
    chip(p.moonraker ? "ok" : "err", p.moonraker ? "Moonraker connected" : "Moonraker not connected");
    var k;
    if (!p.moonraker) k = ["", "Klipper unknown"];
    else if (!p.klipper) k = [running ? "warn" : "err", running ? "Klipper stopped for the job" : "Klipper not connected"];
    else if (p.klippyState === "ready") k = ["ok", "Klipper ready"];
    else if (p.klippyState === "startup") k = ["warn", "Klipper starting"];
    else k = ["err", "Klipper " + p.klippyState];
    chip(k[0], k[1]);
    if (p.printState === "printing" || p.printState === "paused") chip("warn", p.printState);
    $("pmsg").textContent = p.klipper && p.klippyState !== "ready" ? p.message : "";
  }

  function renderJob() {
    var job = state.job;
    $("job").hidden = !job;
    $("idle").hidden = !!job;
    if (!job) { document.title = "moonflash"; return; }
    var running = !job.result, p = job.progress;
    $("kind").textContent = job.kind === "ota" ? "OTA" : "flash";
    $("label").textContent = job.label;
    $("label").title = job.target;
    var st = $("jstate");
    st.textContent = running ? "running" : job.result.ok ? "done" : "failed";
    st.className = "state " + (running ? "run" : job.result.ok ? "ok" : "err");
    var stage = $("stage");
    clear(stage);
    stage.appendChild(el("b", null, job.stage));
    if (job.message) stage.appendChild(document.createTextNode(" \\u2014 " + job.message));
    var pct = p && p.percent !== null ? p.percent : null;
    if (!running && job.result.ok) pct = 100;
    $("bar").hidden = pct === null;
    $("pline").hidden = pct === null;
    if (pct !== null) {
      $("fill").style.width = pct + "%";
      $("fill").className = "fill" + (running ? "" : job.result.ok ? " ok" : " err");
      $("bar").setAttribute("aria-valuenow", String(pct));
      $("pct").textContent = pct + "%" + (p && p.phase ? " " + p.phase : "");
      $("amount").textContent = running ? amount(p) : "";
    }
    renderBoards(job.boards);
    var r = $("result");
    if (running) { r.hidden = true; }
    else {
      r.hidden = false;
      r.className = "result " + (job.result.ok ? "ok" : "err");
      r.textContent = job.result.ok ? "Finished " + when(job.finishedAt) + "." : (job.result.code ? job.result.code + ": " : "") + (job.result.message || "failed");
    }
    document.title = (running ? (pct !== null ? pct + "% " : "") + job.label : job.label + (job.result.ok ? " done" : " failed")) + " \\u00b7 moonflash";
  }

  function renderBoards(boards) {
    var table = $("boards");
    table.hidden = boards.length === 0;
    clear(table);
    for (var i = 0; i < boards.length; i++) {
      var b = boards[i], tr = el("tr");
      tr.appendChild(el("td", "n", b.name));
      tr.appendChild(el("td", "s " + b.state, (BOARD_STATES[b.state] || b.state) + (b.state === "flashing" && b.order ? " (" + b.order + ")" : "")));
      var td = el("td", "p");
      if (b.state === "flashing" && b.progress && b.progress.percent !== null) {
        td.textContent = b.progress.percent + "%";
        var mini = el("div", "mini"), f = el("div");
        f.style.width = b.progress.percent + "%";
        mini.appendChild(f);
        td.appendChild(mini);
      } else if (b.state === "failed") {
        td.textContent = (b.code ? b.code + ": " : "") + (b.message || "");
      }
      tr.appendChild(td);
      table.appendChild(tr);
    }
  }

  function renderLog() {
    if (shownLog === state.log) return;
    shownLog = state.log;
    var box = $("log"), atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    clear(box);
    $("logcard").hidden = state.log.length === 0;
    for (var i = 0; i < state.log.length; i++) {
      var l = state.log[i], li = el("li", l.level);
      li.appendChild(el("time", null, clock(l.ts)));
      li.appendChild(document.createTextNode(l.message));
      box.appendChild(li);
    }
    if (atEnd) box.scrollTop = box.scrollHeight;
  }

  function renderHistory() {
    if (shownHistory === state.history) return;
    shownHistory = state.history;
    var list = $("history");
    clear(list);
    $("historycard").hidden = state.history.length === 0;
    for (var i = 0; i < state.history.length; i++) {
      var h = state.history[i], li = el("li");
      li.appendChild(el("time", null, when(h.finishedAt)));
      var t = el("span", "t", (h.kind === "ota" ? "OTA " : "") + h.label);
      if (!h.ok && h.message) t.appendChild(el("span", "m", h.message));
      li.appendChild(t);
      li.appendChild(el("span", "o " + (h.ok ? "ok" : "err"), h.ok ? "\\u2713 ok" : "\\u2717 " + (h.code || "failed")));
      list.appendChild(li);
    }
  }

  function render() { renderPrinter(); renderJob(); renderLog(); renderHistory(); }

  function live(cls, text) {
    var l = $("live");
    l.className = "live" + (cls ? " " + cls : "");
    l.textContent = text;
    document.body.className = cls ? "stale" : "";
  }

  var source = null;
  function connect() {
    source = new EventSource("events");
    source.addEventListener("snapshot", function (m) { state = JSON.parse(m.data); live("", "live"); render(); });
    source.addEventListener("job", function (m) {
      var u = JSON.parse(m.data);
      if (!state.job || state.job.id !== u.job.id) state.log = [];
      state.job = u.job;
      if (u.line) state.log = state.log.concat([u.line]).slice(-LOG_LINES);
      render();
    });
    source.addEventListener("history", function (m) { state.history = JSON.parse(m.data); renderHistory(); });
    source.addEventListener("printer", function (m) { state.printer = JSON.parse(m.data); renderPrinter(); });
    source.onerror = function () {
      // EventSource retries by itself after a dropped stream; it gives up only on an HTTP error (e.g. 503 when
      // too many pages are open), so then this page tries again later.
      if (source.readyState === 2) {
        live("down", "offline \\u2014 retrying");
        source.close();
        setTimeout(connect, 10000);
      } else {
        live("retry", "reconnecting\\u2026");
      }
    };
  }

  render();
  if (typeof EventSource === "function") connect(); else live("down", "no live updates in this browser");
})();
`;

export const PAGE_SCRIPT: string = SCRIPT;

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The page, with the snapshot (from pageJson: "<" escaped) as its first paint. */
export function renderPage(snapshotJson: string, version: string | null): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="color-scheme" content="dark">
<link rel="icon" href="data:,">
<title>moonflash</title>
<style>${STYLE}</style>
</head>
<body>
<header><div class="brand">moonflash<small>${version === null ? "" : `v${escapeHtml(version)}`}</small></div><div id="live" class="live retry">connecting\u2026</div></header>
<main>
<div id="printer" class="chips"></div>
<p id="pmsg" class="muted"></p>
<section id="idle" class="card muted">No job has run since moonflash started.</section>
<section id="job" class="card" hidden>
<div class="row"><span id="kind" class="badge"></span><h1 id="label"></h1><span id="jstate" class="state"></span></div>
<div id="stage" class="stage"></div>
<div id="bar" class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" hidden><div id="fill" class="fill"></div></div>
<div id="pline" class="pline" hidden><span id="pct"></span><span id="amount"></span></div>
<table id="boards" hidden></table>
<div id="result" class="result" hidden></div>
</section>
<section id="logcard" class="card" hidden><h2>Log</h2><ol id="log" class="log"></ol></section>
<section id="historycard" class="card" hidden><h2>Recent jobs</h2><ol id="history" class="history"></ol></section>
</main>
<script id="snapshot" type="application/json">${snapshotJson}</script>
<script>${SCRIPT}</script>
</body>
</html>
`;
}
