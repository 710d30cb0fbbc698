// Live page: new enrollments and refusals arrive as server-sent events; the table and counters update in place.
"use strict";
(function () {
  const table = document.getElementById("live");
  if (!table || !window.EventSource) { return; }
  const body = table.querySelector("tbody");
  const state = document.getElementById("stream-state");
  const seen = new Set(Array.from(body.querySelectorAll("tr[data-key]")).map((r) => r.dataset.key));
  const source = new EventSource("/live/stream?since=" + encodeURIComponent(table.dataset.since));
  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
  source.addEventListener("open", () => { state.textContent = "live"; });
  source.addEventListener("error", () => { state.textContent = "reconnecting…"; });
  // the console ends the stream of an operator revoked while watching; do not knock again
  source.addEventListener("denied", (msg) => {
    source.close();
    state.textContent = "closed: " + JSON.parse(msg.data).reason;
  });
  source.addEventListener("enrollment", (msg) => {
    const e = JSON.parse(msg.data);
    if (seen.has(e.key)) { return; }
    seen.add(e.key);
    const row = document.createElement("tr");
    row.dataset.key = e.key;
    row.className = e.status === 200 ? "ok" : "refused";
    const link = document.createElement("a");
    link.href = "/devices/" + encodeURIComponent(e.device_id);
    link.textContent = e.device_id;
    const device = document.createElement("td");
    device.appendChild(link);
    row.append(cell(e.time), device, cell(e.kind), cell(e.status === 200 ? "issued" : "refused " + e.status),
      cell(e.status === 200 ? e.serial : e.reason));
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > 200) { body.deleteRow(-1); }
  });
  source.addEventListener("stats", (msg) => {
    const c = JSON.parse(msg.data);
    for (const name of ["issued_per_min", "refused_per_min", "otp_failures"]) {
      document.getElementById(name).textContent = c[name];
    }
    document.getElementById("lockouts").textContent = c.lockouts >= 0 ? c.lockouts : "n/a";
  });
})();
