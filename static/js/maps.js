// Colour scales for the result maps, changed in the browser: the clip percentile per map, a
// scale shared by a method's maps of all images (or by one image's targets), and a smoothed
// magnitude view for gradient maps.
//
// The stored pictures use each method's default scale (app/rendering.py) and are what the page
// shows first. Any other scale is re-coloured here from the panel's .npy -- fetched once, only
// when one of its pictures is on screen -- with the renderer's own lookup tables and
// arithmetic, and shown through a blob: URL (the Content-Security-Policy allows blob: images
// and forbids inline scripts and styles). The arrays themselves never change.
"use strict";

(function () {
  // --- pure functions (also window.convscopeMaps, which the browser tests call) --------------

  // A little-endian float32 .npy file (what np.save writes for a map) as {shape, data}.
  function parseNpy(buffer) {
    const bytes = new Uint8Array(buffer);
    const magic = String.fromCharCode.apply(null, bytes.subarray(1, 6));
    if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
    const view = new DataView(buffer);
    const major = bytes[6];
    const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const start = major === 1 ? 10 : 12;
    const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
    if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
      throw new Error("only C-ordered little-endian float32 maps are supported");
    }
    const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",")
      .map((part) => part.trim()).filter((part) => part !== "").map(Number);
    const offset = start + headerLength;
    const count = shape.reduce((a, b) => a * b, 1);
    // np.save pads the header to a multiple of 64 bytes, so the data is aligned for a view.
    const data = offset % 4 === 0 ? new Float32Array(buffer, offset, count)
      : new Float32Array(buffer.slice(offset, offset + count * 4));
    return { shape, data };
  }

  // numpy's default ("linear") percentile of already sorted values.
  function percentileOfSorted(sorted, percent) {
    if (sorted.length === 0) return 0;
    const position = (sorted.length - 1) * percent / 100;
    const below = Math.floor(position);
    const above = Math.min(sorted.length - 1, below + 1);
    return sorted[below] + (sorted[above] - sorted[below]) * (position - below);
  }

  // The colour range for each clip percentile (as app.rendering.clipped_ranges): signed maps
  // get ± the percentile of |map|, unsigned ones their minimum up to the percentile; 100 is the
  // full range, and a percentile at the bottom of the range falls back to it.
  function clippedRanges(values, signed, percents) {
    const magnitudes = Float32Array.from(values, (v) => (Number.isFinite(v) ? (signed ? Math.abs(v) : v) : 0));
    magnitudes.sort();
    const n = magnitudes.length;
    let full;
    if (n === 0) full = [0, 0];
    else if (signed) full = [-magnitudes[n - 1], magnitudes[n - 1]];
    else full = [magnitudes[0], magnitudes[n - 1]];
    const ranges = {};
    percents.forEach((percent) => {
      let range = full;
      if (percent < 100 && n > 0) {
        const level = percentileOfSorted(magnitudes, percent);
        if (signed && level > 0) range = [-level, level];
        else if (!signed && level > full[0]) range = [full[0], level];
      }
      ranges[formatPercent(percent)] = range;
    });
    return ranges;
  }

  // |values| blurred by a Gaussian of standard deviation sigma (pixels), as
  // scipy.ndimage.gaussian_filter(abs(values), sigma, mode="reflect", truncate=4).
  function smoothMagnitude(values, width, height, sigma) {
    const radius = Math.floor(4 * sigma + 0.5);
    const weights = new Float64Array(2 * radius + 1);
    let total = 0;
    for (let i = -radius; i <= radius; i++) {
      weights[i + radius] = Math.exp(-0.5 * (i * i) / (sigma * sigma));
      total += weights[i + radius];
    }
    for (let i = 0; i < weights.length; i++) weights[i] /= total;
    const reflect = (index, size) => {   // d c b a | a b c d | d c b a
      const period = 2 * size;
      let r = ((index % period) + period) % period;
      return r < size ? r : period - 1 - r;
    };
    const rows = new Float64Array(width * height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        let sum = 0;
        for (let k = -radius; k <= radius; k++) {
          sum += weights[k + radius] * Math.abs(values[y * width + reflect(x + k, width)]);
        }
        rows[y * width + x] = sum;
      }
    }
    const out = new Float32Array(width * height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        let sum = 0;
        for (let k = -radius; k <= radius; k++) {
          sum += weights[k + radius] * rows[reflect(y + k, height) * width + x];
        }
        out[y * width + x] = sum;
      }
    }
    return out;
  }

  // RGBA pixels of a map through a 256-entry lookup table (Uint8Array of 768), as
  // app.rendering.colorize: unsigned maps low..high -> 0..1, signed maps 0 -> 0.5 and
  // ± max(|low|, |high|) -> 0 and 1; values outside the range saturate.
  function colourize(values, signed, range, table) {
    const pixels = new Uint8ClampedArray(values.length * 4);
    const low = range[0];
    const high = range[1];
    const bound = Math.max(Math.abs(low), Math.abs(high));
    for (let i = 0; i < values.length; i++) {
      let v = values[i];
      if (!Number.isFinite(v)) v = 0;
      let unit;
      if (signed) unit = bound > 0 ? 0.5 + 0.5 * v / bound : 0.5;
      else unit = high > low ? (v - low) / (high - low) : 0;
      unit = Math.min(1, Math.max(0, unit));
      const entry = Math.round(unit * 255) * 3;
      pixels[4 * i] = table[entry];
      pixels[4 * i + 1] = table[entry + 1];
      pixels[4 * i + 2] = table[entry + 2];
      pixels[4 * i + 3] = 255;
    }
    return pixels;
  }

  function hexTable(hex) {
    const table = new Uint8Array(hex.length / 2);
    for (let i = 0; i < table.length; i++) table[i] = parseInt(hex.substr(2 * i, 2), 16);
    return table;
  }

  function formatPercent(percent) { return String(Number(percent)); }

  function ordinal(percent) {
    const text = formatPercent(percent);
    if (!Number.isInteger(Number(percent))) return text + "th";
    const whole = Number(percent);
    if (whole % 100 >= 10 && whole % 100 <= 20) return text + "th";
    return text + ({ 1: "st", 2: "nd", 3: "rd" }[whole % 10] || "th");
  }

  // The legend's sentence (app.rendering.scale_description, plus the shared forms).
  function describeScale(clip, signed, shared) {
    if (Number(clip) >= 100) {
      if (shared) return "full range of them all";
      return signed ? "full range: ± the largest |value|" : "full range: minimum to maximum";
    }
    const where = shared ? "the largest of their " + ordinal(clip) + " percentiles"
      : "the " + ordinal(clip) + " percentile";
    return signed ? "values beyond ± " + where + " of |map| saturate"
      : "values above " + where + " saturate";
  }

  function formatNumber(value) {    // Python's '%.3g', as the server's legends
    if (value === 0 || !Number.isFinite(value)) return String(value === 0 ? 0 : value);
    const [mantissa, exponentText] = Number(value).toExponential(2).split("e");
    const exponent = Number(exponentText);
    const strip = (text) => (text.indexOf(".") >= 0 ? text.replace(/\.?0+$/, "") : text);
    if (exponent < -4 || exponent >= 3) {
      const digits = String(Math.abs(exponent)).padStart(2, "0");
      return strip(mantissa) + "e" + (exponent < 0 ? "-" : "+") + digits;
    }
    return strip(Number(value).toFixed(2 - exponent));
  }

  window.convscopeMaps = {
    parseNpy, percentileOfSorted, clippedRanges, smoothMagnitude, colourize, hexTable,
    describeScale, formatNumber,
  };

  // --- the page -----------------------------------------------------------------------------

  const results = document.getElementById("results");
  const job = document.getElementById("job");
  if (!results || !job) return;
  const tables = {
    unsigned: hexTable(job.dataset.colormapUnsigned),
    signed: hexTable(job.dataset.colormapSigned),
  };
  let mode = "panel";
  const methodTitles = JSON.parse(job.dataset.methodTitles || "[]");
  let viewAllChoice = "values";
  let clipAllChoice = "default";

  // Every map panel of the job, from its JSON twin (the page holds only what is on screen:
  // the grid, and the views opened so far). Panel ids are p<image>-<method>-<panel>.
  const panels = new Map();
  let registry = null;
  function ensureRegistry() {
    if (!registry) {
      registry = (async () => {
        const response = await fetch(job.dataset.apiUrl, {
          credentials: "same-origin", headers: { Accept: "application/json" },
        });
        if (!response.ok) throw new Error("job: HTTP " + response.status);
        const data = await response.json();
        data.results.forEach((result, image) => {
          result.visualizations.forEach((item, method) => {
            item.panels.forEach((record, number) => {
              if (record.kind !== "heatmap" || !record.display) return;
              const id = "p" + image + "-" + method + "-" + number;
              if (!panels.has(id)) panels.set(id, newPanel(id, image, method, record.signed,
                                                         record.array_url, record.display));
            });
          });
        });
        return panels;
      })();
    }
    return registry;
  }

  function newPanel(id, row, method, signed, arrayUrl, display) {
    const defaultClip = display.clip_percentile ? formatPercent(display.clip_percentile) : "100";
    let clip = clipAllChoice === "default" ? defaultClip : clipAllChoice;
    if (!(clip in display.ranges)) clip = "100";
    return {
      id, row, method, display, defaultClip, signed, arrayUrl, clip,
      fixed: display.scale === "fixed",
      smoothable: Boolean(display.smoothing_sigma_px),
      view: display.smoothing_sigma_px ? viewAllChoice : "values",
      scale: null,               // the scale shown now (null: the stored default)
      touched: 0,                // when the reader last chose for this panel (its group's lead)
      shownKey: null, wantedKey: null,
      array: null, smoothed: null, smoothedRanges: null, blobUrl: null,
    };
  }

  const images = (panel) => document.querySelectorAll('img.map-image[data-panel-id="' + panel.id + '"]');
  const legendsOf = (panel) => document.querySelectorAll('.legend[data-panel-id="' + panel.id + '"]');
  const selectsOf = (panel, className) => document.querySelectorAll(
    'figure.panel[data-panel-id="' + panel.id + '"] .' + className);

  function group(panel) {
    if (mode === "panel" || panel.fixed) return [panel];
    return Array.from(panels.values()).filter((other) => !other.fixed
      && other.method === panel.method && other.signed === panel.signed
      && (mode === "method" || other.row === panel.row));
  }

  async function loadArray(panel) {
    if (!panel.array) {
      panel.array = (async () => {
        const response = await fetch(panel.arrayUrl, { credentials: "same-origin" });
        if (!response.ok) throw new Error("map " + panel.id + ": HTTP " + response.status);
        return parseNpy(await response.arrayBuffer());
      })();
    }
    return panel.array;
  }

  async function smoothedOf(panel) {
    if (!panel.smoothed) {
      const { shape, data } = await loadArray(panel);
      panel.smoothed = smoothMagnitude(data, shape[1], shape[0], panel.display.smoothing_sigma_px);
      panel.smoothedRanges = clippedRanges(panel.smoothed, false,
        Object.keys(panel.display.ranges).map(Number));
    }
    return panel.smoothed;
  }

  // The range a panel should show now: its own at its clip, or its group's combined.
  async function wantedScale(panel) {
    const members = group(panel);
    const smoothed = panel.view === "smoothed";
    const signed = panel.signed && !smoothed;
    const ranges = [];
    for (const member of members) {
      if (smoothed) {
        await smoothedOf(member);
        ranges.push(member.smoothedRanges[member.clip]);
      } else {
        ranges.push(member.display.ranges[member.clip] || member.display.range);
      }
    }
    let range;
    if (signed) {
      const bound = Math.max(...ranges.map((r) => Math.max(Math.abs(r[0]), Math.abs(r[1]))));
      range = [-bound, bound];
    } else {
      range = [Math.min(...ranges.map((r) => r[0])), Math.max(...ranges.map((r) => r[1]))];
    }
    return { range, signed, smoothed, shared: members.length > 1, count: members.length,
             clip: panel.clip, mode };
  }

  function sameRange(a, b) {
    return Math.abs(a[0] - b[0]) <= 1e-12 * Math.max(1, Math.abs(b[0]))
      && Math.abs(a[1] - b[1]) <= 1e-12 * Math.max(1, Math.abs(b[1]));
  }

  function legendText(panel, scale) {
    let where = "Own scale";
    if (scale.shared) {
      where = (scale.mode === "method" ? "Shared by all images' " : "Shared by this image's ")
        + scale.count + " " + methodTitles[panel.method] + " maps";
    }
    let text = where + ": " + describeScale(scale.clip, scale.signed, scale.shared) + ".";
    if (scale.smoothed) {
      text = "Smoothed |map| (Gaussian blur, σ = " + panel.display.smoothing_sigma_px
        + " px), not the values. " + text;
    }
    return text;
  }

  function updateLegend(legend, panel, scale) {
    const clipped = Number(scale.clip) < 100;
    legend.querySelector(".legend-bar").className = "legend-bar " + (scale.signed ? "signed" : "unsigned");
    const labels = legend.querySelector(".legend-labels");
    labels.replaceChildren();
    const add = (className, content) => {
      const span = document.createElement("span");
      span.className = className;
      span.textContent = content;
      labels.appendChild(span);
    };
    add("legend-low", (clipped && scale.signed ? "≤ " : "") + formatNumber(scale.range[0]));
    if (scale.signed) add("legend-zero", "0");
    add("legend-high", (clipped ? "≥ " : "") + formatNumber(scale.range[1]));
    legend.querySelector(".legend-scale").textContent = legendText(panel, scale);
    legend.classList.toggle("shared", scale.shared);
  }

  function showPicture(image, panel) {
    if (panel.blobUrl) {
      if (!image.dataset.storedSrc) image.dataset.storedSrc = image.getAttribute("src");
      if (image.src !== panel.blobUrl) image.src = panel.blobUrl;
    } else if (image.dataset.storedSrc && image.getAttribute("src") !== image.dataset.storedSrc) {
      image.src = image.dataset.storedSrc;
    }
  }

  async function paint(panel, key, scale) {
    const { shape, data } = await loadArray(panel);
    const values = scale.smoothed ? await smoothedOf(panel) : data;
    const table = tables[scale.signed ? "signed" : "unsigned"];
    const pixels = colourize(values, scale.signed, scale.range, table);
    const canvas = document.createElement("canvas");
    canvas.width = shape[1];
    canvas.height = shape[0];
    canvas.getContext("2d").putImageData(new ImageData(pixels, shape[1], shape[0]), 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    if (panel.wantedKey !== key) return;      // the reader chose again meanwhile
    if (panel.blobUrl) URL.revokeObjectURL(panel.blobUrl);
    panel.blobUrl = URL.createObjectURL(blob);
    panel.shownKey = key;
    images(panel).forEach((image) => showPicture(image, panel));
  }

  // Pictures on screen (or about to be): only their maps are fetched and re-coloured now.
  const onScreen = new Set();
  const pending = new Map();     // panel id -> {key, scale} not yet painted
  const observer = new IntersectionObserver((entries) => {
    entries.forEach((entry) => {
      if (entry.isIntersecting) onScreen.add(entry.target);
      else onScreen.delete(entry.target);
      const id = entry.target.dataset.panelId;
      if (entry.isIntersecting && pending.has(id)) {
        const { key, scale } = pending.get(id);
        pending.delete(id);
        paint(panels.get(id), key, scale).catch(report);
      }
    });
  }, { rootMargin: "300px" });

  function report(error) {
    results.dataset.scaleError = String(error && error.message ? error.message : error);
  }

  let generation = 0;
  async function refresh() {
    const mine = ++generation;
    results.setAttribute("aria-busy", "true");
    await ensureRegistry();
    for (const panel of panels.values()) {
      if (panel.fixed) continue;
      const scale = await wantedScale(panel);
      if (mine !== generation) return;
      panel.scale = scale;
      legendsOf(panel).forEach((legend) => updateLegend(legend, panel, scale));
      const isStored = !scale.smoothed && sameRange(scale.range, panel.display.range);
      const key = isStored ? null : JSON.stringify([scale.smoothed, scale.range]);
      panel.wantedKey = key;
      pending.delete(panel.id);
      if (key === panel.shownKey) continue;
      if (key === null) {
        if (panel.blobUrl) URL.revokeObjectURL(panel.blobUrl);
        panel.blobUrl = null;
        panel.shownKey = null;
        images(panel).forEach((image) => showPicture(image, panel));
      } else if (Array.from(images(panel)).some((image) => onScreen.has(image))) {
        paint(panel, key, scale).catch(report);
      } else {
        pending.set(panel.id, { key, scale });
      }
    }
    if (mine === generation) results.removeAttribute("aria-busy");
  }

  let touches = 0;
  function setChoice(panel, field, value) {
    panel.touched = ++touches;
    group(panel).forEach((member) => {
      if (field === "view" && !member.smoothable) return;
      member[field] = value;
      selectsOf(member, field === "clip" ? "clip-select" : "view-select")
        .forEach((select) => { select.value = value; });
    });
  }

  // A panel's own choices, beside its opacity slider: the clip percentile, and for gradient
  // maps the smoothed-magnitude view.
  function addChoices(figure) {
    const controls = figure.querySelector(".panel-controls");
    const display = JSON.parse(figure.dataset.display);
    if (!controls || display.scale === "fixed" || controls.querySelector(".clip-select")) return;
    const id = figure.dataset.panelId;
    const select = (label, className, options, value, field) => {
      const wrapper = document.createElement("label");
      wrapper.append(label + " ");
      const element = document.createElement("select");
      element.className = className;
      options.forEach(([key, text]) => element.add(new Option(text, key)));
      element.value = value;
      element.addEventListener("change", async () => {
        await ensureRegistry();
        setChoice(panels.get(id), field, element.value);
        refresh().catch(report);
      });
      wrapper.appendChild(element);
      controls.appendChild(wrapper);
    };
    const defaultClip = display.clip_percentile ? formatPercent(display.clip_percentile) : "100";
    const known = panels.get(id);
    const percents = Object.keys(display.ranges).map(Number).sort((a, b) => b - a);
    select("Clip", "clip-select", percents.map((percent) => {
      const key = formatPercent(percent);
      return [key, (percent >= 100 ? "max" : key + " %") + (key === defaultClip ? " (default)" : "")];
    }), known ? known.clip : defaultClip, "clip");
    if (display.smoothing_sigma_px) {
      select("Show", "view-select", [["values", "values"], ["smoothed", "smoothed magnitude"]],
             known ? known.view : "values", "view");
    }
  }

  // Pictures, legends and panels that arrive with an opened view take the current scales.
  function adopt(root) {
    root.querySelectorAll("figure.panel[data-display]").forEach(addChoices);
    root.querySelectorAll("img.map-image[data-panel-id]").forEach((image) => {
      observer.observe(image);
      const panel = panels.get(image.dataset.panelId);
      if (panel) showPicture(image, panel);
    });
    root.querySelectorAll(".legend[data-panel-id]").forEach((legend) => {
      const panel = panels.get(legend.dataset.panelId);
      if (panel && panel.scale) updateLegend(legend, panel, panel.scale);
    });
  }
  adopt(results);
  new MutationObserver((changes) => changes.forEach((change) => change.addedNodes.forEach((node) => {
    if (node.nodeType === Node.ELEMENT_NODE) adopt(node);
  }))).observe(results, { childList: true, subtree: true });

  const opacity = document.getElementById("opacity-all");
  if (opacity) {          // every overlay that its own panel's slider has not set
    opacity.addEventListener("input", () => {
      results.style.setProperty("--map-opacity", opacity.value);
    });
  }

  const modeSelect = document.getElementById("scale-mode");
  const clipAll = document.getElementById("clip-all");
  const viewAll = document.getElementById("view-all");
  if (modeSelect) {
    modeSelect.addEventListener("change", async () => {
      await ensureRegistry();
      mode = modeSelect.value;
      // A shared scale needs one clip and one view per group: those of the map the reader
      // chose for last (else its first map's).
      const done = new Set();
      panels.forEach((panel) => {
        if (done.has(panel.id)) return;
        const members = group(panel);
        const lead = members.reduce((a, b) => (b.touched > a.touched ? b : a));
        members.forEach((member) => {
          done.add(member.id);
          member.clip = lead.clip;
          if (member.smoothable) member.view = lead.view;
          selectsOf(member, "clip-select").forEach((select) => { select.value = member.clip; });
          selectsOf(member, "view-select").forEach((select) => { select.value = member.view; });
        });
      });
      refresh().catch(report);
    });
  }
  if (clipAll) {
    clipAll.addEventListener("change", async () => {
      clipAllChoice = clipAll.value;
      await ensureRegistry();
      panels.forEach((panel) => {
        panel.clip = clipAll.value === "default" ? panel.defaultClip : clipAll.value;
        if (!(panel.clip in panel.display.ranges)) panel.clip = "100";
        selectsOf(panel, "clip-select").forEach((select) => { select.value = panel.clip; });
      });
      refresh().catch(report);
    });
  }
  if (viewAll) {
    viewAll.addEventListener("change", async () => {
      viewAllChoice = viewAll.value;
      await ensureRegistry();
      panels.forEach((panel) => {
        if (!panel.smoothable) return;
        panel.view = viewAll.value;
        selectsOf(panel, "view-select").forEach((select) => { select.value = panel.view; });
      });
      refresh().catch(report);
    });
  }
})();
