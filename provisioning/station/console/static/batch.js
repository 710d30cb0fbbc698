// Batch page: follow the making of the passwords, then reload once to offer the hand-over forms.
"use strict";
(function () {
  const box = document.getElementById("making");
  if (!box || box.dataset.done === "yes") { return; }
  const made = document.getElementById("made");
  const text = document.getElementById("made-text");
  function poll() {
    fetch(box.dataset.progress, { credentials: "same-origin" }).then((r) => r.json()).then((p) => {
      made.value = p.made;
      text.textContent = p.made + " / " + p.total;
      if (p.done || p.error) { window.location.reload(); } else { window.setTimeout(poll, 300); }
    }).catch(() => window.setTimeout(poll, 1000));
  }
  poll();
})();
