// The flag console's only script. The pages work without it; with it, the flag list shows how
// many new flags have arrived since it was loaded (a small JSON poll every five seconds).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (!live || !live.dataset.poll) {
    return;
  }
  const count = live.querySelector("span");
  const tick = async () => {
    try {
      const response = await fetch(live.dataset.poll, {
        credentials: "same-origin",
        headers: { accept: "application/json" },
      });
      if (!response.ok) {
        return;
      }
      const body = await response.json();
      if (typeof body.new === "number" && body.new > 0) {
        count.textContent = body.new >= 100 ? "100+ new flags" :
          `${body.new} new flag${body.new === 1 ? "" : "s"}`;
        live.hidden = false;
      }
    } catch (_) {
      // The gateway is restarting or the network is down: try again at the next tick.
    }
  };
  setInterval(tick, 5000);
});
