// Workbench: drag-and-drop / file-picker uploads with thumbnails, then the job as JSON.
// Without this script the form still works: it posts files and fields to "/" in one request.
// User data (file names, error messages) is only ever inserted with textContent.
"use strict";

(function () {
  document.documentElement.classList.add("js");
  const form = document.getElementById("workbench");
  if (!form) return;

  const fileInput = document.getElementById("image-input");
  const list = document.getElementById("image-list");
  const dropzone = document.getElementById("dropzone");
  const status = document.getElementById("submit-status");
  const runButton = document.getElementById("run-button");
  const maxImages = Number(form.dataset.maxImages || 16);
  // With authentication on, the session cookie signs these calls in; the page's CSRF token in
  // a header proves they come from this page (app/auth.py). Harmless when it is off.
  const csrfInput = form.querySelector("input[name=csrf_token]");
  const csrfHeaders = csrfInput ? { "X-CSRF-Token": csrfInput.value } : {};
  const uploads = [];

  function say(message) {
    status.textContent = message;
  }

  function apiError(body, response) {
    const error = body && body.error;
    return new Error(error ? error.code + ": " + error.message : "HTTP " + response.status);
  }

  async function postImage(file) {
    const data = new FormData();
    data.append("image", file, file.name);
    const response = await fetch(form.dataset.uploadUrl, {
      method: "POST", body: data, credentials: "same-origin", headers: csrfHeaders,
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw apiError(body, response);
    return body.images[0];
  }

  // A File to upload, or an image uploaded before the page reloaded for another model.
  function addFile(file, restored) {
    const displayName = restored ? restored.filename : file.name;
    const item = document.createElement("li");
    item.className = "thumb";
    const thumbnail = document.createElement("img");
    thumbnail.alt = "";
    const previewUrl = restored ? null : URL.createObjectURL(file);
    thumbnail.src = previewUrl || form.dataset.imageUrl.replace("IMAGE_ID", restored.id);
    const name = document.createElement("span");
    name.className = "filename";
    name.textContent = displayName;
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = "uploading…";
    const label = document.createElement("label");
    label.textContent = "True label (optional)";
    const trueLabel = document.createElement("input");
    trueLabel.className = "true-label";
    trueLabel.setAttribute("list", "class-names");
    label.append(trueLabel);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", "Remove " + displayName);
    item.append(thumbnail, name, state, label, remove);
    list.append(item);

    const upload = { item, id: null, trueLabel };
    const ready = (image) => {
      upload.id = image.id;
      upload.filename = image.filename;
      upload.image = { id: image.id, filename: image.filename, width: image.width,
                       height: image.height };
      item.dataset.imageId = image.id;
      state.textContent = "ready · " + image.width + "×" + image.height;
      thumbnail.src = form.dataset.imageUrl.replace("IMAGE_ID", image.id);
      if (previewUrl) URL.revokeObjectURL(previewUrl);
    };
    if (restored) {
      trueLabel.value = restored.trueLabel || "";
      ready(restored);
      upload.done = Promise.resolve();
    } else {
      upload.done = postImage(file).then(ready).catch((error) => {
        item.classList.add("failed");
        state.textContent = error.message;
      });
    }
    remove.addEventListener("click", () => {
      uploads.splice(uploads.indexOf(upload), 1);
      item.remove();
      if (previewUrl) URL.revokeObjectURL(previewUrl);
      fileInput.focus();
    });
    uploads.push(upload);
  }

  function addFiles(files) {
    const chosen = Array.from(files);
    const room = Math.max(0, maxImages - uploads.length);
    chosen.slice(0, room).forEach((file) => addFile(file));
    if (chosen.length > room) say("A job takes at most " + maxImages + " images; the rest were left out.");
    fileInput.value = "";
  }

  fileInput.addEventListener("change", () => addFiles(fileInput.files));

  // Sample images: fetch the bundled photo and upload its bytes like a chosen file.
  async function addSample(button) {
    button.disabled = true;
    try {
      const response = await fetch(button.dataset.sampleUrl, { credentials: "same-origin" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const blob = await response.blob();
      addFiles([new File([blob], button.dataset.sampleName, { type: blob.type })]);
    } catch (error) {
      say("The sample image could not be loaded: " + error.message);
    } finally {
      button.disabled = false;
    }
  }
  form.querySelectorAll("button.sample").forEach((button) => {
    button.addEventListener("click", () => addSample(button));
  });
  ["dragenter", "dragover"].forEach((type) => dropzone.addEventListener(type, (event) => {
    event.preventDefault();
    dropzone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => dropzone.addEventListener(type, () => {
    dropzone.classList.remove("dragging");
  }));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files) addFiles(event.dataTransfer.files);
  });

  // Another model changes the parameter choices and class list: reload the form for it,
  // keeping the images already uploaded (and their true labels) for this browser tab.
  const KEPT_UPLOADS = "convscope.workbench.uploads";
  try {
    const kept = JSON.parse(window.sessionStorage.getItem(KEPT_UPLOADS) || "[]");
    window.sessionStorage.removeItem(KEPT_UPLOADS);
    kept.slice(0, maxImages).forEach((image) => addFile(null, image));
  } catch (error) {
    // Storage unavailable or unreadable: start with an empty list.
  }
  form.querySelectorAll("input[name=model]").forEach((radio) => {
    radio.addEventListener("change", () => {
      const kept = uploads.filter((upload) => upload.image).map((upload) =>
        Object.assign({ trueLabel: upload.trueLabel.value }, upload.image));
      try {
        window.sessionStorage.setItem(KEPT_UPLOADS, JSON.stringify(kept));
      } catch (error) {
        // Storage unavailable: the images must be added again.
      }
      const url = new URL(window.location.href);
      url.search = "";
      url.searchParams.set("model", radio.value);
      window.location.assign(url.toString());
    });
  });

  function lastValue(data, key) {
    const values = data.getAll(key);
    return values.length ? values[values.length - 1] : "";
  }

  function jobRequest(data, ready) {
    const keys = Array.from(new Set(data.keys()));
    const visualizations = data.getAll("method").map((name) => {
      const prefix = "param." + name + ".";
      const params = {};
      keys.filter((key) => key.startsWith(prefix)).forEach((key) => {
        const value = lastValue(data, key);
        if (value !== "") params[key.slice(prefix.length)] = value;
      });
      return { name, params };
    });
    let targets = ["predicted"];
    const targetClass = String(data.get("target_class") || "").trim();
    if (data.get("target_mode") === "class" && targetClass) targets = [targetClass];
    const images = [];
    const trueLabels = {};
    const filenames = {};
    ready.forEach((upload) => {
      if (!images.includes(upload.id)) images.push(upload.id);
      filenames[upload.id] = filenames[upload.id] || upload.filename;
      const label = upload.trueLabel.value.trim();
      if (label) trueLabels[upload.id] = label;
    });
    return {
      model: data.get("model") || "latest", images, visualizations, targets,
      true_labels: trueLabels, filenames,
    };
  }

  form.addEventListener("submit", async (event) => {
    if (event.submitter && event.submitter.getAttribute("formmethod") === "get") return;
    event.preventDefault();
    runButton.disabled = true;
    try {
      say("Waiting for uploads…");
      await Promise.all(uploads.map((upload) => upload.done));
      const ready = uploads.filter((upload) => upload.id);
      if (!ready.length) {
        say("Add at least one image that uploaded successfully.");
        return;
      }
      const data = new FormData(form);
      if (!data.getAll("method").length) {
        say("Choose at least one visualization.");
        return;
      }
      say("Starting the job…");
      const response = await fetch(form.dataset.jobsUrl, {
        method: "POST", credentials: "same-origin",
        headers: Object.assign({ "Content-Type": "application/json", "Accept": "application/json" },
                               csrfHeaders),
        body: JSON.stringify(jobRequest(data, ready)),
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        say(apiError(body, response).message);
        return;
      }
      window.location.assign(body.url);
    } catch (error) {
      say("The request failed: " + error.message);
    } finally {
      runButton.disabled = false;
    }
  });
})();
