// Evaluation page: live progress while the evaluation runs (polling its JSON twin without the
// per-image list), then a count of the selected images for Explain. Without this script the
// page refreshes itself while running (<noscript> meta refresh) and the forms work as they are.
"use strict";

(function () {
  document.documentElement.classList.add("js");
  const root = document.getElementById("evaluation");
  if (!root) return;

  // One image may be listed twice (in a cell and among the failures): its boxes move together.
  const boxes = Array.from(document.querySelectorAll("input.image-choice"));
  const count = document.getElementById("selected-count");
  const initialHint = count ? count.textContent : "";
  function chosen() {
    return new Set(boxes.filter((box) => box.checked).map((box) => box.value));
  }
  boxes.forEach((box) => {
    box.addEventListener("change", () => {
      boxes.filter((other) => other.value === box.value).forEach((other) => {
        other.checked = box.checked;
      });
      const selected = chosen().size;
      if (count) count.textContent = selected ? selected + " selected. " + initialHint : initialHint;
    });
  });

  if (root.dataset.finished === "true") return;

  const statusBadge = document.getElementById("evaluation-status");
  const bar = document.getElementById("evaluation-progress");
  const percent = document.getElementById("evaluation-percent");

  function update(evaluation) {
    statusBadge.textContent = evaluation.status;
    statusBadge.className = "status status-" + evaluation.status;
    if (bar) bar.value = evaluation.progress;
    if (percent) percent.textContent = Math.round(evaluation.progress * 100) + "%";
    document.getElementById("model-runs").textContent = evaluation.model_runs;
    document.getElementById("cache-hits").textContent = evaluation.cache_hits;
  }

  window.convscopePollUntilDone(root.dataset.apiUrl + "?images=0", update, 600);
})();
