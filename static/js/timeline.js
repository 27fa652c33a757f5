// Timeline page: live progress while the timeline runs (then a reload shows the result), and a
// notice when the training run writes a new checkpoint (polling the model list), with a button
// that extends the timeline. Without this script the running page refreshes itself.
"use strict";

(function () {
  const root = document.getElementById("timeline");
  if (!root) return;
  const terminal = new Set(["done", "failed", "cancelled"]);

  async function getJson(url) {
    const response = await fetch(url, { credentials: "same-origin",
                                        headers: { "Accept": "application/json" } });
    return response.ok ? response.json() : null;
  }

  async function pollJob() {
    try {
      const timeline = await getJson(root.dataset.apiUrl);
      if (timeline) {
        document.getElementById("timeline-status").textContent = timeline.status;
        document.getElementById("timeline-progress").value = timeline.progress;
        document.getElementById("timeline-percent").textContent =
          Math.round(timeline.progress * 100) + "%";
        document.getElementById("model-runs").textContent = timeline.model_runs;
        document.getElementById("cache-hits").textContent = timeline.cache_hits;
        if (terminal.has(timeline.status)) { window.location.reload(); return; }
      }
    } catch (error) { /* the next poll tries again */ }
    window.setTimeout(pollJob, 1000);
  }

  const known = new Set((root.dataset.known || "").split(",").filter(Boolean));
  const created = Number(root.dataset.created || 0);
  async function pollModels() {
    try {
      const listing = await getJson(root.dataset.modelsUrl);
      const models = listing ? (listing.models || []) : [];
      // Written after the timeline was asked for (a checkpoint left out by "every" is not new).
      const fresh = models.filter((model) => model.ok && !known.has(model.id) &&
                                             model.modified > created);
      const notice = document.getElementById("new-checkpoints");
      if (fresh.length && notice) {
        document.getElementById("new-checkpoints-text").textContent =
          fresh.length + " new checkpoint" + (fresh.length === 1 ? "" : "s") + " written: " +
          fresh.map((model) => model.file).join(", ") + ".";
        notice.hidden = false;
      }
    } catch (error) { /* the next poll tries again */ }
    window.setTimeout(pollModels, 3000);
  }

  if (root.dataset.finished !== "true") pollJob();
  pollModels();
})();
