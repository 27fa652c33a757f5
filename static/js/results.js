// The results grid: the keyboard moves between cells (arrows, Home/End, Ctrl+Home/End), Enter
// or a click opens a cell's detail in place -- right under its row -- and, while a detail is
// open, moving to another cell shows that cell's detail. A row heading opens "every method on
// this image", a column heading "this method on every image", both in place; Esc closes.
//
// Without this script the same links work: CSS shows the section named by the URL's #fragment
// (:target) below the grid.
"use strict";

(function () {
  const grid = document.getElementById("results-grid");
  const results = document.getElementById("results");
  const home = document.getElementById("views");
  if (!grid || !results || !home) return;

  const rows = Array.from(grid.tBodies[0].rows);
  const matrix = rows.map((row) => Array.from(row.querySelectorAll("a.cell")));
  const cells = matrix.flat();
  const columns = grid.tHead.rows[0].cells.length;
  let current = cells[0] || null;      // the one cell reachable with Tab (roving tabindex)
  let open = null;                     // {section, row (tr), origin (element to refocus)}

  cells.forEach((cell) => {
    cell.tabIndex = cell === current ? 0 : -1;
    cell.setAttribute("aria-expanded", "false");
  });

  function position(cell) {
    for (let r = 0; r < matrix.length; r++) {
      const c = matrix[r].indexOf(cell);
      if (c >= 0) return [r, c];
    }
    return [0, 0];
  }

  function focusCell(cell) {
    if (!cell) return;
    if (current) current.tabIndex = -1;
    current = cell;
    cell.tabIndex = 0;
    cell.focus({ preventScroll: true });
    cell.scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  function close(refocus) {
    if (!open) return;
    const { section, viewRow, origin } = open;
    section.classList.remove("open");
    home.appendChild(section);
    viewRow.remove();
    grid.querySelectorAll(".cell.open").forEach((cell) => {
      cell.classList.remove("open");
      cell.setAttribute("aria-expanded", "false");
    });
    open = null;
    history.replaceState(null, "", location.pathname + location.search);
    if (refocus && origin) origin.focus({ preventScroll: false });
  }

  // Show a detail or compare section in a full-width row of the grid: after `afterRow`, or
  // first in the body when null (a method across every image).
  function show(sectionId, afterRow, origin) {
    const section = document.getElementById(sectionId);
    if (!section) return;
    if (open && open.section === section) return;
    close(false);
    const viewRow = document.createElement("tr");
    viewRow.className = "view-row";
    const holder = document.createElement("td");
    holder.className = "view-cell";
    holder.colSpan = columns;
    holder.appendChild(section);
    viewRow.appendChild(holder);
    const body = grid.tBodies[0];
    body.insertBefore(viewRow, afterRow ? afterRow.nextSibling : body.firstChild);
    section.classList.add("open");
    if (origin && origin.classList.contains("cell")) {
      origin.classList.add("open");
      origin.setAttribute("aria-expanded", "true");
    }
    open = { section, viewRow, origin };
    history.replaceState(null, "", "#" + sectionId);
    const box = section.getBoundingClientRect();
    if (box.bottom > window.innerHeight || box.top < 0) {
      section.scrollIntoView({ block: box.height > window.innerHeight ? "start" : "nearest" });
    }
  }

  function openCell(cell) {
    show(cell.dataset.detail, cell.closest("tr"), cell);
  }

  function openCompare(link) {
    const id = link.dataset.compare;
    const row = id.startsWith("compare-image-") ? link.closest("tr") : null;
    show(id, row, link);
    document.getElementById(id).focus({ preventScroll: true });
  }

  grid.addEventListener("click", (event) => {
    const cell = event.target.closest("a.cell");
    if (cell && grid.contains(cell)) {
      event.preventDefault();
      focusCell(cell);
      if (open && open.origin === cell) close(true);
      else openCell(cell);
      return;
    }
    const compare = event.target.closest("a.compare-link");
    if (compare) {
      event.preventDefault();
      if (open && open.section.id === compare.dataset.compare) close(true);
      else openCompare(compare);
      return;
    }
    const toDetail = event.target.closest("a[data-detail]");
    if (toDetail) {          // from a compare view to one map's detail
      event.preventDefault();
      const cell = document.getElementById(toDetail.dataset.detail.replace("detail-", "cell-"));
      focusCell(cell);
      openCell(cell);
      return;
    }
    const closer = event.target.closest("a.view-close");
    if (closer) {
      event.preventDefault();
      close(true);
    }
  });

  grid.addEventListener("keydown", (event) => {
    const cell = event.target.closest ? event.target.closest("a.cell") : null;
    if (event.key === "Escape" && open) {
      event.preventDefault();
      close(true);
      return;
    }
    if (!cell || event.altKey || event.metaKey) return;
    const [r, c] = position(cell);
    const last = matrix.length - 1;
    let next = null;
    switch (event.key) {
      case "ArrowRight": next = matrix[r][c + 1]; break;
      case "ArrowLeft": next = matrix[r][c - 1]; break;
      case "ArrowDown": next = matrix[r + 1] && matrix[r + 1][c]; break;
      case "ArrowUp": next = matrix[r - 1] && matrix[r - 1][c]; break;
      case "Home": next = event.ctrlKey ? matrix[0][0] : matrix[r][0]; break;
      case "End": next = event.ctrlKey ? matrix[last][matrix[last].length - 1]
        : matrix[r][matrix[r].length - 1]; break;
      case " ": event.preventDefault(); cell.click(); return;
      default: return;
    }
    event.preventDefault();
    if (!next) return;
    const following = open && open.origin && open.origin.classList.contains("cell");
    focusCell(next);
    if (following) openCell(next);      // an open detail follows the keyboard
  });

  // Esc from inside an open view (its sliders and selects) closes it too.
  results.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && open && !grid.contains(event.target)) {
      event.preventDefault();
      close(true);
    }
  });

  // A link to a view (#detail-3-2, #compare-method-1) opens it in place: on arrival, and when
  // the fragment changes (a link from elsewhere on the page, back and forward).
  function openFromHash() {
    const wanted = location.hash.slice(1);
    if (!/^(detail|compare)-/.test(wanted) || !document.getElementById(wanted)) return;
    if (open && open.section.id === wanted) return;
    if (wanted.startsWith("detail-")) {
      const cell = document.getElementById(wanted.replace("detail-", "cell-"));
      if (cell) { focusCell(cell); openCell(cell); }
    } else {
      const link = grid.querySelector('a.compare-link[data-compare="' + wanted + '"]');
      if (link) openCompare(link);
    }
  }
  openFromHash();
  window.addEventListener("hashchange", openFromHash);

  // "convscope:grid-painted": the first frame after the grid's on-screen pictures are decoded
  // (a performance mark, read by the browser tests and visible in any browser's profiler).
  const firstRows = Array.from(grid.querySelectorAll("img[loading=eager]"));
  Promise.all(firstRows.map((image) => image.decode().catch(() => null))).then(() => {
    requestAnimationFrame(() => performance.mark("convscope:grid-painted"));
  });

  const size = document.getElementById("cell-size");
  if (size) {
    size.addEventListener("change", () => {
      grid.classList.remove("size-s", "size-m", "size-l");
      grid.classList.add("size-" + size.value);
    });
  }
  const opacity = document.getElementById("opacity-all");
  if (opacity) {
    opacity.addEventListener("input", () => {
      results.style.setProperty("--map-opacity", opacity.value);
    });
  }
})();
