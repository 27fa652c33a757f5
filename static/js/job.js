// Job page: live progress while the job runs (polling its JSON twin), then the panels' opacity
// sliders (the results grid is results.js, colour scales maps.js).
// Without this script the page refreshes itself every few seconds (<noscript> meta refresh).
"use strict";

(function () {
  document.documentElement.classList.add("js");
  const root = document.getElementById("job");
  if (!root) return;

  // Delegated: the grid's views are opened in place after the page loaded. Until moved, a
  // layer follows the page-wide opacity (maps.js); then its own panel's slider.
  document.addEventListener("input", (event) => {
    const slider = event.target.closest(".opacity-slider");
    const layer = slider && slider.closest(".panel").querySelector(".layer");
    if (layer) layer.style.opacity = slider.value;
  });

  if (root.dataset.finished === "true") return;

  const statusBadge = document.getElementById("job-status");
  const overall = document.getElementById("job-progress");
  const percent = document.getElementById("job-percent");

  function update(job) {
    statusBadge.textContent = job.status;
    statusBadge.className = "status status-" + job.status;
    overall.value = job.progress;
    percent.textContent = Math.round(job.progress * 100) + "%";
    document.getElementById("model-runs").textContent = job.model_runs;
    document.getElementById("cache-hits").textContent = job.cache_hits;
    job.results.forEach((result, imageIndex) => {
      result.visualizations.forEach((item, methodIndex) => {
        const selector = '[data-image="' + imageIndex + '"][data-method="' + methodIndex + '"]';
        const bar = document.querySelector("progress.item-progress" + selector);
        const text = document.querySelector(".item-status" + selector);
        if (bar) bar.value = item.progress;
        if (text) text.textContent = item.status;
      });
    });
  }

  window.convscopePollUntilDone(root.dataset.apiUrl, update, 700);
})();
