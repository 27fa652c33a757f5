// The results grid: the keyboard moves between cells (arrows, Home/End, Ctrl+Home/End), Enter
// or a click opens a cell's detail in place -- right under its row -- and, while a detail is
// open, moving to another cell shows that cell's detail. A row heading opens "every method on
// this image", a column heading "this method on every image", both in place; Esc closes.
//
// Each view is its own page on the server (what these links open without this script); here
// it is fetched once as a fragment (?fragment=1) and kept, so the job page itself holds only
// the grid however many images and methods it has.
"use strict";

(function () {
  const grid = document.getElementById("results-grid");
  const results = document.getElementById("results");
  const home = document.getElementById("views");     // where views wait while closed
  if (!grid || !results || !home) return;

  const rows = Array.from(grid.tBodies[0].rows);
  const matrix = rows.map((row) => Array.from(row.querySelectorAll("a.cell")));
  const cells = matrix.flat();
  const columns = grid.tHead.rows[0].cells.length;
  let current = cells[0] || null;      // the one cell reachable with Tab (roving tabindex)
  let open = null;                     // {viewId, section, viewRow, origin (to refocus)}

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
    if (section) {
      section.classList.remove("open");
      home.appendChild(section);
    }
    viewRow.remove();
    grid.querySelectorAll(".cell.open").forEach((cell) => {
      cell.classList.remove("open");
      cell.setAttribute("aria-expanded", "false");
    });
    open = null;
    history.replaceState(null, "", location.pathname + location.search);
    if (refocus && origin) origin.focus({ preventScroll: false });
  }

  // A view's section: in the page already (opened before, or the static report), else fetched
  // from its own page as a fragment and kept for the next time.
  const loading = new Map();
  function section(viewId, href) {
    const here = document.getElementById(viewId);
    if (here) return Promise.resolve(here);
    if (!loading.has(viewId)) {
      loading.set(viewId, (async () => {
        const url = new URL(href, location.href);
        url.searchParams.set("fragment", "1");
        const response = await fetch(url, { credentials: "same-origin" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const holder = document.createElement("template");
        holder.innerHTML = (await response.text()).trim();
        const fetched = holder.content.firstElementChild;
        if (!fetched || fetched.id !== viewId) throw new Error("unexpected view");
        home.appendChild(fetched);
        return fetched;
      })().finally(() => loading.delete(viewId)));
    }
    return loading.get(viewId);
  }

  // Show a view in a full-width row of the grid: after `afterRow`, or first in the body when
  // null (a method across every image).
  let wanted = null;
  async function show(viewId, href, afterRow, origin) {
    if (open && open.viewId === viewId) return;
    wanted = viewId;
    close(false);
    const viewRow = document.createElement("tr");
    viewRow.className = "view-row";
    const holder = document.createElement("td");
    holder.className = "view-cell";
    holder.colSpan = columns;
    viewRow.appendChild(holder);
    const body = grid.tBodies[0];
    body.insertBefore(viewRow, afterRow ? afterRow.nextSibling : body.firstChild);
    if (origin && origin.classList.contains("cell")) {
      origin.classList.add("open");
      origin.setAttribute("aria-expanded", "true");
    }
    open = { viewId, section: null, viewRow, origin };
    history.replaceState(null, "", "#" + viewId);
    let found;
    try {
      if (!document.getElementById(viewId)) {
        holder.innerHTML = '<p class="view-loading" role="status">Loading…</p>';
      }
      found = await section(viewId, href);
    } catch (error) {
      if (wanted === viewId) {
        holder.replaceChildren();
        const message = document.createElement("p");
        message.className = "alert";
        message.setAttribute("role", "alert");
        message.textContent = "This view could not be loaded (" + error.message + "); ";
        const link = document.createElement("a");
        link.href = href;
        link.textContent = "open it on its own page";
        message.appendChild(link);
        holder.appendChild(message);
      }
      return;
    }
    if (wanted !== viewId || !open || open.viewId !== viewId) return;   // moved on meanwhile
    holder.replaceChildren(found);
    found.classList.add("open");
    open.section = found;
    const box = found.getBoundingClientRect();
    if (box.bottom > window.innerHeight || box.top < 0) {
      found.scrollIntoView({ block: box.height > window.innerHeight ? "start" : "nearest" });
    }
    if (origin && !origin.classList.contains("cell")) found.focus({ preventScroll: true });
  }

  function rowOf(viewId) {
    const parts = viewId.split("-");
    if (parts[0] === "detail" || parts[1] === "image") {
      const row = parts[0] === "detail" ? parts[1] : parts[2];
      return grid.querySelector('tr.grid-row[data-row="' + row + '"]');
    }
    return null;
  }

  function openLink(link) {
    const viewId = link.dataset.view;
    if (viewId.startsWith("detail-")) {
      const cell = document.getElementById(viewId.replace("detail-", "cell-"));
      focusCell(cell);
      return show(viewId, cell.getAttribute("href"), rowOf(viewId), cell);
    }
    return show(viewId, link.getAttribute("href"), rowOf(viewId), link);
  }

  grid.addEventListener("click", (event) => {
    const closer = event.target.closest("a.view-close");
    if (closer) {
      event.preventDefault();
      close(true);
      return;
    }
    const link = event.target.closest("a[data-view]");
    if (!link) return;
    event.preventDefault();
    if (open && open.viewId === link.dataset.view) close(true);
    else openLink(link);
  });

  // While a detail is open, moving the focus opens the new cell's detail once the keys rest.
  let following = null;
  function follow(cell) {
    window.clearTimeout(following);
    following = window.setTimeout(() => openLink(cell), 120);
  }

  grid.addEventListener("keydown", (event) => {
    const cell = event.target.closest ? event.target.closest("a.cell") : null;
    if (event.key === "Escape" && open) {
      event.preventDefault();
      window.clearTimeout(following);
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
    const detailOpen = open && open.origin && open.origin.classList.contains("cell");
    focusCell(next);
    if (detailOpen) follow(next);       // an open detail follows the keyboard
  });

  // Esc anywhere else on the page (inside an open view's sliders and selects, or with
  // nothing focused) closes the open view too.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && open && !event.defaultPrevented && !grid.contains(event.target)) {
      event.preventDefault();
      close(true);
    }
  });

  // A link to a view (#detail-3-2, #compare-method-1) opens it in place: on arrival, and when
  // the fragment changes (a link from elsewhere on the page, back and forward).
  function openFromHash() {
    const viewId = location.hash.slice(1);
    if (!/^(detail-\d+-\d+|compare-(image|method)-\d+)$/.test(viewId)) return;
    if (open && open.viewId === viewId) return;
    const link = grid.querySelector('a[data-view="' + viewId + '"]');
    if (link) openLink(link);
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
})();
