// Outpost dashboard: keeps the #live region current without a reload. Every 2 s (while the tab
// is visible) it fetches the same URL with `x-outpost-live: 1`, which answers the region alone,
// and swaps it in when it changed (not while a form in it has focus). A session that ended sends the browser to the login page.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !live.hasAttribute("data-live")) return;
  var updated = document.getElementById("updated");
  var last = live.innerHTML;
  var busy = false;
  function refresh() {
    if (busy || document.hidden) return;
    // Never swap a form out from under someone using it.
    var active = document.activeElement;
    if (active && live.contains(active) && active.closest("form")) return;
    busy = true;
    fetch(location.pathname + location.search, {
      headers: { "x-outpost-live": "1" },
      credentials: "same-origin",
      cache: "no-store",
      redirect: "manual"
    }).then(function (response) {
      if (response.type === "opaqueredirect" || response.status === 401) {
        location.assign("/ui/login");
        return null;
      }
      return response.ok ? response.text() : null;
    }).then(function (html) {
      if (html === null || html === undefined) return;
      if (html !== last) {
        var focused = document.activeElement;
        var focusId = focused && live.contains(focused) ? focused.id : "";
        live.innerHTML = html;
        last = html;
        if (focusId) {
          var again = document.getElementById(focusId);
          if (again) again.focus();
        }
      }
      if (updated) updated.textContent = "Live: updated " + new Date().toLocaleTimeString() + ".";
    }).catch(function () {
      if (updated) updated.textContent = "Live: control unreachable, retrying.";
    }).then(function () { busy = false; });
  }
  setInterval(refresh, 2000);
  document.addEventListener("visibilitychange", refresh);
})();
