// Polling a running job's JSON twin until it ends, shared by the job and evaluation pages:
// each answer goes to `update`; when the job ends, or is gone (404/410: the page says why), the
// page reloads to show its final state. Failed requests back off, up to 10 s apart.
"use strict";

window.convscopePollUntilDone = function (url, update, stepMs) {
  const terminal = new Set(["done", "failed", "cancelled"]);
  let failures = 0;

  async function poll() {
    try {
      const response = await fetch(url, {
        credentials: "same-origin", headers: { "Accept": "application/json" },
      });
      if (response.ok) {
        const job = await response.json();
        update(job);
        if (terminal.has(job.status)) {
          window.location.reload();
          return;
        }
        failures = 0;
      } else if (response.status === 404 || response.status === 410) {
        window.location.reload();
        return;
      } else {
        failures += 1;
      }
    } catch (error) {
      failures += 1;
    }
    window.setTimeout(poll, Math.min(10000, stepMs * (1 + failures)));
  }

  window.setTimeout(poll, stepMs * 0.7);
};
