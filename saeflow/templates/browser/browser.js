// saeflow latent browser: table search/sort and the latent page (vanilla JS, works from file://).
"use strict";

function saeflowTable() {
  const table = document.getElementById("latents"), input = document.getElementById("search");
  const rows = Array.from(table.tBodies[0].rows), shown = document.getElementById("shown");
  function filter() {
    const q = input.value.trim().toLowerCase();
    let n = 0;
    for (const r of rows) {
      const id = r.dataset.id, hit = !q || (/^#?\d+$/.test(q) ? id === q.replace("#", "") : r.textContent.toLowerCase().includes(q));
      r.hidden = !hit; n += hit;
    }
    shown.textContent = n;
  }
  input.addEventListener("input", filter);
  const q = new URLSearchParams(location.search).get("q");
  if (q !== null) input.value = q;
  filter();
  table.querySelectorAll("th.sortable").forEach((th, col) => {
    th.addEventListener("click", () => {
      const key = th.dataset.key, desc = th.dataset.dir !== "desc";
      th.dataset.dir = desc ? "desc" : "asc";
      const val = r => key === "tags" ? r.dataset.tags : parseFloat(r.dataset[key]);
      rows.sort((a, b) => { const x = val(a), y = val(b); return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1); });
      for (const r of rows) table.tBodies[0].appendChild(r);
    });
  });
}

function saeflowLatent(shardSize, edges) {
  const shards = {};
  window.saeflowShard = (n, data) => { shards[n] = data; render(); };
  const el = id => document.getElementById(id);
  function esc(s) { return s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
  function current() { const j = parseInt(location.hash.slice(1), 10); return Number.isFinite(j) ? j : 0; }
  function load() {
    const n = Math.floor(current() / shardSize);
    if (shards[n]) return render();
    const s = document.createElement("script"); s.src = "data/" + n + ".js";
    s.onerror = () => { el("latent").textContent = "no data for latent " + current(); };
    document.head.appendChild(s);
  }
  function histogram(h0, h) {
    if (!h.length) return "<p class='muted'>never fired in the scanned rows</p>";
    const W = 320, H = 90, bw = W / h.length, top = Math.max(...h);
    let bars = "";
    h.forEach((c, i) => { const bh = c ? Math.max(1, H * c / top) : 0;
      bars += `<rect x='${(i * bw).toFixed(1)}' y='${(H - bh).toFixed(1)}' width='${Math.max(bw - 1, 1).toFixed(1)}' height='${bh.toFixed(1)}' fill='#e66100'><title>${edges[h0 + i]}–${edges[h0 + i + 1]}: ${c}</title></rect>`; });
    return `<svg width='${W}' height='${H + 16}' role='img' aria-label='activation histogram'>${bars}` +
      `<text x='0' y='${H + 13}' font-size='11'>${edges[h0]}</text><text x='${W}' y='${H + 13}' font-size='11' text-anchor='end'>${edges[h0 + h.length]}</text></svg>`;
  }
  function render() {
    const j = current(), data = shards[Math.floor(j / shardSize)];
    if (!data) return;
    const L = data.latents[j], S = data.strings;
    if (!L) { el("latent").textContent = "no latent " + j; return; }
    document.title = "latent " + j + " · " + document.title.split(" · ").pop();
    el("name").textContent = "Latent " + j;
    el("stats").innerHTML = `<tr><td>fired on</td><td>${L.count} rows (frequency ${L.freq})</td></tr>` +
      `<tr><td>mean / max activation</td><td>${L.mean} / ${L.max}</td></tr>`;
    el("hist").innerHTML = histogram(L.h0, L.h);
    const link = ([s, j]) => s === data.me ? ` <a href='latent.html#${j}'>#${j}</a>`
      : ` <a href='../${esc(data.keys[s])}/latent.html#${j}'>${esc(data.keys[s])} #${j}</a>`;
    const toks = list => list.map(([s, v]) => `<span class='tag'>${esc(S[s])}</span> ${v}`).join("<br>");
    el("up").innerHTML = toks(L.up); el("down").innerHTML = toks(L.down);
    const peak = Math.max(L.max || 0, 1e-9);
    const ctx = kind => L.ctx.filter(c => c.k === kind).map(c => {
      const spans = c.t.map((s, i) => { const v = c.v[i] || 0, a = Math.min(1, v / peak).toFixed(2);
        return `<span class='tok${i === c.c ? " center" : ""}' style='background: rgba(230,97,0,${a})' title='${v}'>${esc(S[s]).replace(/\n/g, "⏎")}</span>`; }).join("");
      return `<div class='ctx'><span class='act'>${c.a}</span>${spans}</div>`; }).join("") || "<p class='muted'>none</p>";
    el("top").innerHTML = ctx("top"); el("sample").innerHTML = ctx("sample");
    el("facts").innerHTML = L.facts.length ? L.facts.map(f => `<li><span class='eval'>${esc(f.e)}</span>: ${esc(f.t)}` +
      f.l.map(link).join("") + "</li>").join("")
      : "<li class='muted'>no evaluation singled this latent out</li>";
    el("prev").href = "#" + Math.max(0, j - 1); el("next").href = "#" + (j + 1);
  }
  window.addEventListener("hashchange", load);
  load();
}
