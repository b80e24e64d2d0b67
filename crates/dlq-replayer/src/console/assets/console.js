// The console's few lines of script, all optional: without them every page still works.
// - <main data-refresh="N"> reloads its contents in place every N seconds (paused while
//   anything in it has the focus, so the keyboard's place and an open <details> stay);
//   a lost session sends the page to the login. What its [data-announce] elements say is
//   copied to the page's status line (#live, outside <main>) when it changes, for a
//   screen reader to announce: the change, not the whole page at every refresh.
// - <form data-confirm="question"> asks before it is sent.
// - <input data-select-all> checks or clears every row's box of its table.
"use strict";
(function () {
  const main = document.querySelector("main[data-refresh]");
  if (main) {
    const seconds = Math.max(1, Number(main.dataset.refresh) || 5);
    const live = document.getElementById("live");
    const said = () => [...main.querySelectorAll("[data-announce]")].map((el) => el.textContent.trim()).join(" ");
    let last = said();
    const refresh = async () => {
      const active = document.activeElement;
      if (active && active !== main && main.contains(active)) return;
      try {
        const response = await fetch(location.href, { headers: { "X-Console-Fragment": "1" }, credentials: "same-origin" });
        if (response.status === 401) { location.assign("/ui/login"); return; }
        if (!response.ok) return;
        main.innerHTML = await response.text();
        main.dataset.refreshedAt = String(Date.now());
        const now = said();
        if (live && now !== last) live.textContent = now;
        last = now;
      } catch (_) { /* the next tick tries again */ }
    };
    setInterval(refresh, seconds * 1000);
  }
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });
  document.addEventListener("change", (event) => {
    const box = event.target;
    if (box instanceof HTMLInputElement && box.hasAttribute("data-select-all")) {
      const table = box.closest("table");
      if (table) table.querySelectorAll('input[type="checkbox"][name="id"]').forEach((b) => { b.checked = box.checked; });
    }
  });
})();
