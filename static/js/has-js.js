// Loaded in <head>, before the body is laid out: marks the page as scripted at once, so the
// controls that only work with JavaScript (.js-only) take their place in the first layout
// instead of pushing the results down later (an inline script would do, but the
// Content-Security-Policy forbids inline scripts).
"use strict";
document.documentElement.classList.add("js");
