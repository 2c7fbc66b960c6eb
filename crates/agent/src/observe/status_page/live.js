// Live updates for the status page: every 2 s, fetch the page again and swap in its <main>.
// The page is whole without this script (the numbers are in the HTML and a <noscript> meta
// refresh reloads it); this only spares the reload's flash and keeps the scroll position.
(function () {
  "use strict";
  var PERIOD_MS = 2000;
  var live = document.getElementById("live");
  var updates = 0;
  function show(text, state) {
    live.textContent = text;
    live.className = "live " + state;
  }
  function tick() {
    // A hidden tab asks nothing of the agent.
    if (document.hidden) {
      setTimeout(tick, PERIOD_MS);
      return;
    }
    // Only the <main> part: a whole page would bring a style with a nonce this page refuses.
    fetch("/?part=main", { cache: "no-store", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("models");
        var current = document.getElementById("models");
        if (!next || !current) throw new Error("no models in the answer");
        current.replaceWith(document.adoptNode(next));
        updates += 1;
        // Read by the browser test: the swap really happened.
        document.body.setAttribute("data-live-updates", String(updates));
        show("live", "ok");
      })
      .catch(function (error) {
        show("agent unreachable (" + error.message + "), retrying", "down");
      })
      .then(function () {
        // Chained rather than setInterval: a slow answer never piles requests up.
        setTimeout(tick, PERIOD_MS);
      });
  }
  show("live", "ok");
  setTimeout(tick, PERIOD_MS);
})();
