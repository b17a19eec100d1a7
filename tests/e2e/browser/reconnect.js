// SMAP web UI's notification socket, as the browser runs it: reconnect with exponential
// backoff only after an unclean close. Every event is reported to the test's HTTP server.
//
// Query parameters: ws (the WebSocket URL), token (put in the smap_auth_token cookie, which
// is per host, not per port, so it goes with the upgrade to the daemon's port).
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const wsUrl = params.get("ws");
  const INITIAL_BACKOFF_MS = 200;
  const MAX_BACKOFF_MS = 5000;
  const PING_EVERY_MS = 30000; // the web UI sends a JSON ping every 30 s
  let backoff = INITIAL_BACKOFF_MS;
  let attempt = 0;
  let seq = 0;

  function report(event) {
    seq += 1;
    event.seq = seq;
    event.t = Math.round(performance.now());
    fetch("/event", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(event),
      keepalive: true,
    }).catch(() => {});
  }

  function connect() {
    attempt += 1;
    const thisAttempt = attempt;
    const ws = new WebSocket(wsUrl);
    let pinger = null;
    ws.onopen = () => {
      backoff = INITIAL_BACKOFF_MS;
      pinger = setInterval(() => ws.send(JSON.stringify({ type: "ping" })), PING_EVERY_MS);
      report({ type: "open", attempt: thisAttempt });
    };
    ws.onmessage = (event) => {
      report({ type: "message", attempt: thisAttempt, data: event.data });
    };
    ws.onclose = (event) => {
      clearInterval(pinger);
      const reconnect = !event.wasClean;
      report({
        type: "close",
        attempt: thisAttempt,
        code: event.code,
        wasClean: event.wasClean,
        reconnect: reconnect,
        delay: reconnect ? backoff : null,
      });
      if (reconnect) {
        setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      }
    };
  }

  const token = params.get("token");
  if (token) {
    document.cookie = "smap_auth_token=" + token + "; path=/; SameSite=Lax";
  }
  report({ type: "loaded", cookie: document.cookie.indexOf("smap_auth_token=") >= 0 });
  connect();
})();
