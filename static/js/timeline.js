// Timeline page: live progress while the timeline runs, then the finished page swapped in where
// the running one was (fetched and parsed: no reload, the scroll position and the page's state
// stay); a notice when the training run writes a new checkpoint (polling the model list), with
// a button that extends the timeline. "Follow training" (kept in the address as ?follow=1)
// extends it by itself: it posts the same form asking for JSON, polls the extended timeline
// until it ends, swaps its page in and puts its address in the address bar.
// Without this script the running page refreshes itself and the notice's form still works.
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

  function following() {
    const box = document.getElementById("follow-training");
    return Boolean(box && box.checked);
  }

  // A timeline page's address (this page's query kept), with ?follow=1 while following.
  function pageAddress(url) {
    const address = new URL(url, window.location.href);
    if (following()) address.searchParams.set("follow", "1");
    else address.searchParams.delete("follow");
    return address.pathname + address.search;
  }

  // Fetch a timeline page and put its #timeline (content and data) in place of this one's;
  // the address bar then shows that page's address.
  async function swapIn(address) {
    const response = await fetch(address, { credentials: "same-origin",
                                            headers: { "Accept": "text/html" } });
    if (!response.ok) throw new Error("the timeline page answered " + response.status);
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("timeline");
    if (!fresh) throw new Error("the timeline page has no timeline");
    for (const name of Object.keys(root.dataset)) delete root.dataset[name];
    Object.assign(root.dataset, fresh.dataset);
    root.replaceChildren(...Array.from(fresh.childNodes,
                                       (node) => document.importNode(node, true)));
    if (page.title) document.title = page.title;
    if (address !== window.location.pathname + window.location.search) {
      window.history.replaceState(null, "", address);
    }
  }

  function showProgress(timeline) {
    document.getElementById("timeline-status").textContent = timeline.status;
    document.getElementById("timeline-progress").value = timeline.progress;
    document.getElementById("timeline-percent").textContent =
      Math.round(timeline.progress * 100) + "%";
    document.getElementById("model-runs").textContent = timeline.model_runs;
    document.getElementById("cache-hits").textContent = timeline.cache_hits;
  }

  // Poll a timeline's JSON until it ends (each answer to `onProgress`); its last answer.
  async function waitUntilEnded(apiUrl, onProgress, stepMs) {
    for (;;) {
      const timeline = await getJson(apiUrl);
      if (timeline) {
        onProgress(timeline);
        if (terminal.has(timeline.status)) return timeline;
      }
      await new Promise((resolve) => window.setTimeout(resolve, stepMs));
    }
  }

  async function pollJob() {
    try {
      await waitUntilEnded(root.dataset.apiUrl, showProgress, 1000);
      await swapIn(pageAddress(window.location.href));
    } catch (error) {
      window.setTimeout(pollJob, 1000);     // the next poll tries again
    }
  }

  // The notice: its text, and whether the Extend button shows (not while following).
  function notify(text, withButton) {
    const notice = document.getElementById("new-checkpoints");
    if (!notice) return;
    document.getElementById("new-checkpoints-text").textContent = text;
    document.getElementById("new-checkpoints-action").hidden = !withButton;
    notice.hidden = false;
  }

  function fileList(models) {
    return models.map((model) => model.file).join(", ");
  }

  let extending = false;      // one extension at a time
  const givenUp = new Set(); // checkpoints an extension failed on: the button retries them

  async function extend(fresh) {
    extending = true;
    const names = fileList(fresh);
    const form = document.querySelector("#new-checkpoints form");
    try {
      notify("Adding " + names + " to the timeline\u2026", false);
      const response = await fetch(form.action, {
        method: "POST", credentials: "same-origin", body: new FormData(form),
        headers: { "Accept": "application/json" } });
      const answer = await response.json();
      if (response.status !== 202) throw new Error(answer.error ? answer.error.message
                                                               : "HTTP " + response.status);
      const timeline = await waitUntilEnded(answer.api_url, (running) => notify(
        "Adding " + names + " to the timeline\u2026 " + Math.round(running.progress * 100) + "%",
        false), 700);
      if (timeline.status !== "done") {
        throw new Error(timeline.error ? timeline.error.message : "it was " + timeline.status);
      }
      await swapIn(pageAddress(answer.url));
    } catch (error) {
      fresh.forEach((model) => givenUp.add(model.id));
      notify("Could not add " + names + ": " + error.message, true);
    } finally {
      extending = false;
    }
  }

  // Checkpoints left out of the timeline on purpose ("every", a chosen pair): those the first
  // look at the list finds outside the timeline and written before it was asked for. Any other
  // checkpoint outside the (possibly extended) timeline is new -- also one written just before
  // an extension was asked for that the server had not listed yet (it lists a file once it
  // has settled), which a comparison with the extension's creation time would lose.
  let leftOut = null;

  async function checkModels() {
    const listing = await getJson(root.dataset.modelsUrl);
    if (!listing) return;
    const models = listing.models || [];
    const known = new Set((root.dataset.known || "").split(",").filter(Boolean));
    if (leftOut === null) {
      const created = Number(root.dataset.created || 0);
      leftOut = new Set(models.filter((model) => !known.has(model.id) &&
                                                 !(model.modified > created))
                              .map((model) => model.id));
    }
    const fresh = models.filter((model) => model.ok && !known.has(model.id) &&
                                           !leftOut.has(model.id));
    if (!fresh.length || extending) return;
    const written = fresh.length + " new checkpoint" + (fresh.length === 1 ? "" : "s") +
                    " written: " + fileList(fresh) + ".";
    if (!following() || fresh.every((model) => givenUp.has(model.id))) {
      notify(written, true);
    } else if (root.dataset.status === "done") {
      extend(fresh);
    } else if (root.dataset.finished === "true") {
      notify(written + " (Follow training only extends a timeline that is done.)", true);
    } else {
      notify(written + " They are added when this timeline is done.", false);
    }
  }

  async function pollModels() {
    try { await checkModels(); } catch (error) { /* the next poll tries again */ }
    window.setTimeout(pollModels, 3000);
  }

  // The checkbox is replaced with the rest of the timeline on every swap: listen on the root.
  root.addEventListener("change", (event) => {
    if (event.target.id !== "follow-training") return;
    window.history.replaceState(null, "", pageAddress(window.location.href));
    if (following()) checkModels().catch(() => { /* the next poll tries again */ });
  });

  if (root.dataset.finished !== "true") pollJob();
  pollModels();
})();
