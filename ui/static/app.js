// Bulkhead UI: progressive enhancement only; every page works without it.
// Loaded from /static (the CSP allows no inline script).
"use strict";

// Forms marked data-confirm ask before submitting (approve, enforce, disable user).
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});
