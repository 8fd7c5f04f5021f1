// txgateway dashboard: polls /admin/stats and draws it.  Read-only; no
// framework, no build step.  Text from the gateway is only ever set as
// textContent, never parsed as HTML.
(function () {
  "use strict";

  var TOKEN_KEY = "txgateway.admin.token";
  var POLL_MS = 2000;
  var timer = null;

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function show(id, visible) { $(id).classList.toggle("hidden", !visible); }

  function storedToken() {
    try { return window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function storeToken(value) {
    try {
      if (value) { window.sessionStorage.setItem(TOKEN_KEY, value); } else { window.sessionStorage.removeItem(TOKEN_KEY); }
    } catch (e) { /* storage disabled: the token lives until the page is left */ }
    memoryToken = value;
  }

  var memoryToken = storedToken();

  // -- formatting ------------------------------------------------------------

  function rate(value) {
    if (value === null || value === undefined) { return "–"; }
    if (value === 0) { return "0"; }
    if (value < 0.1) { return value.toFixed(3); }
    if (value < 10) { return value.toFixed(2); }
    return value.toFixed(1);
  }

  function percent(value) {
    if (value === null || value === undefined) { return "–"; }
    if (value === 0) { return "0%"; }
    return (value * 100).toFixed(value < 0.1 ? 2 : 1) + "%";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) { return "–"; }
    if (seconds < 0.001) { return (seconds * 1e6).toFixed(0) + " µs"; }
    if (seconds < 1) { return (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + " ms"; }
    return seconds.toFixed(2) + " s";
  }

  function clockTime(epochSeconds) {
    var date = new Date(epochSeconds * 1000);
    return date.toLocaleString();
  }

  function severity(errorRate) {
    if (errorRate === null || errorRate === undefined || errorRate === 0) { return ""; }
    return errorRate >= 0.05 ? "bad" : "warn";
  }

  // -- drawing ---------------------------------------------------------------

  function drawRoutes(stats) {
    var body = $("routes");
    body.replaceChildren();
    var total = 0;
    var known = false;
    stats.routes.forEach(function (route) {
      var traffic = route.traffic;
      var row = el("tr", "route");
      row.dataset.route = route.name;
      row.dataset.rate = traffic ? String(traffic.request_rate) : "";

      row.appendChild(el("td", "name", route.name));

      var match = el("td");
      var methods = route.methods.length ? route.methods.join(",") : "ANY";
      match.appendChild(el("code", null, methods + " " + route.paths.join(" ")));
      route.hosts.forEach(function (host) { match.appendChild(el("div", "muted small", "host " + host)); });
      if (route.websocket) { match.appendChild(el("span", "chip kind", "websocket")); }
      if (route.grpc) { match.appendChild(el("span", "chip kind", "grpc")); }
      row.appendChild(match);

      row.appendChild(el("td", null, route.upstream));

      var middlewares = el("td");
      route.middlewares.forEach(function (name) { middlewares.appendChild(el("span", "chip", name)); });
      if (!route.middlewares.length) { middlewares.appendChild(el("span", "muted", "–")); }
      row.appendChild(middlewares);

      var rateCell = el("td", "num rate", traffic ? rate(traffic.request_rate) : "–");
      row.appendChild(rateCell);
      var errors = traffic ? traffic.error_rate : null;
      row.appendChild(el("td", ("num errors " + severity(errors)).trim(), percent(errors)));
      row.appendChild(el("td", "num p99", duration(traffic ? traffic.p99 : null)));
      body.appendChild(row);
      if (traffic) { total += traffic.request_rate; known = true; }
    });
    show("no-routes", stats.routes.length === 0);
    $("count-routes").textContent = String(stats.routes.length);
    $("total-rate").textContent = known ? rate(total) : "–";
    if (!stats.metrics_enabled) {
      $("window").textContent = "(metrics disabled: observability.metrics.enabled is false)";
    } else if (stats.window === null) {
      $("window").textContent = "(rates after the next sample)";
    } else {
      $("window").textContent = "(rates over the last " + Math.round(stats.window) + " s)";
    }
  }

  function drawUpstreams(stats) {
    var box = $("upstreams");
    box.replaceChildren();
    var healthy = 0;
    var instances = 0;
    stats.upstreams.forEach(function (upstream) {
      var card = el("div", "upstream");
      card.dataset.upstream = upstream.name;
      var title = el("h3");
      title.appendChild(el("span", null, upstream.name));
      var availability = upstream.available + "/" + upstream.instances.length + " available";
      var state = upstream.available === upstream.instances.length ? "ok" : (upstream.available === 0 ? "bad" : "warn");
      title.appendChild(el("span", "badge " + state, availability));
      card.appendChild(title);

      var meta = el("div", "meta");
      meta.appendChild(el("span", "chip", upstream.protocol));
      if (upstream.active_checks) { meta.appendChild(el("span", "chip", "health checks")); }
      if (upstream.passive_health) { meta.appendChild(el("span", "chip", "outlier ejection")); }
      if (upstream.breaker) {
        var breaker = el("span", "badge breaker " + upstream.breaker.state, "breaker " + upstream.breaker.state.replace("_", "-"));
        breaker.dataset.breaker = upstream.breaker.state;
        meta.appendChild(breaker);
      }
      card.appendChild(meta);

      var list = el("ul", "instances");
      upstream.instances.forEach(function (instance) {
        var item = el("li", "instance");
        item.dataset.address = instance.address;
        item.dataset.status = instance.status;
        item.appendChild(el("code", null, instance.address));
        var detail = instance.status;
        if (instance.status === "ejected" && instance.ejected_for > 0) {
          detail += " " + Math.ceil(instance.ejected_for) + " s";
        }
        item.appendChild(el("span", "badge " + instance.status, detail));
        list.appendChild(item);
        instances += 1;
        if (instance.status === "healthy") { healthy += 1; }
      });
      card.appendChild(list);
      box.appendChild(card);
    });
    show("no-upstreams", stats.upstreams.length === 0);
    $("count-upstreams").textContent = String(stats.upstreams.length);
    var healthyTile = $("count-healthy");
    healthyTile.textContent = healthy + "/" + instances;
    healthyTile.className = "value" + (healthy < instances ? (healthy === 0 ? " bad" : " warn") : "");
    var open = stats.breakers.filter(function (b) { return b.state === "open"; }).length;
    var openTile = $("count-open");
    openTile.textContent = String(open);
    openTile.className = "value" + (open ? " bad" : "");
  }

  function drawReload(stats) {
    var box = $("last-reload");
    box.replaceChildren();
    var last = stats.last_reload;
    $("generation").textContent = stats.generation === null ? "–" : String(stats.generation);
    var status = $("reload-status");
    if (!last) {
      status.textContent = "–";
      status.className = "badge";
      box.appendChild(el("p", "muted", "No reload recorded yet."));
      return;
    }
    status.textContent = last.ok ? "ok" : "failed";
    status.className = "badge " + (last.ok ? "ok" : "bad");
    var line = el("p");
    line.appendChild(el("span", "badge " + (last.ok ? "ok" : "bad"), last.ok ? "ok" : "failed"));
    var words = " " + last.trigger + " at " + clockTime(last.at) + ", generation " + last.generation;
    if (last.unchanged) { words += " (file unchanged)"; }
    line.appendChild(document.createTextNode(words));
    box.appendChild(line);
    if (last.source) { box.appendChild(el("div", "muted small", last.source)); }
    var items = last.ok ? last.changes : last.errors;
    if (items.length) {
      var list = el("ul", "plain");
      items.forEach(function (text) { list.appendChild(el("li", last.ok ? null : "bad", text)); });
      box.appendChild(list);
    }
  }

  function draw(stats) {
    show("login", false);
    show("problem", false);
    show("overview", true);
    drawRoutes(stats);
    drawUpstreams(stats);
    drawReload(stats);
    var ready = $("ready");
    ready.textContent = stats.ready ? "ready" : ("not ready: " + (stats.not_ready_reason || ""));
    ready.className = "badge " + (stats.ready ? "ok" : "bad");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function problem(text) {
    var box = $("problem");
    box.textContent = text;
    show("problem", true);
    $("updated").textContent = "not updated since " + new Date().toLocaleTimeString();
  }

  function askForToken(message) {
    show("overview", false);
    show("problem", false);
    $("login-message").textContent = message;
    show("login", true);
    $("updated").textContent = "waiting for the admin token";
    $("token").focus();
  }

  // -- polling ---------------------------------------------------------------

  function schedule() {
    if (timer !== null) { window.clearTimeout(timer); }
    timer = window.setTimeout(poll, POLL_MS);
  }

  function poll() {
    timer = null;
    var headers = { "Accept": "application/json" };
    if (memoryToken) { headers.Authorization = "Bearer " + memoryToken; }
    window.fetch("/admin/stats", { headers: headers, cache: "no-store", credentials: "omit" })
      .then(function (response) {
        if (response.status === 401) {
          var had = Boolean(memoryToken);
          storeToken(null);
          askForToken(had
            ? "The gateway refused that token. Enter the admin token (admin.token, ADMIN_TOKEN)."
            : "The admin API needs the bearer token (admin.token, ADMIN_TOKEN).");
          return; // polling resumes when a token is entered
        }
        if (!response.ok) {
          return response.json().then(
            function (body) { problem("/admin/stats answered " + response.status + ": " + (body.message || body.error)); },
            function () { problem("/admin/stats answered " + response.status); }
          ).then(schedule);
        }
        return response.json().then(function (stats) { draw(stats); schedule(); });
      })
      .catch(function (error) {
        problem("The admin listener did not answer (" + error + "); retrying.");
        schedule();
      });
  }

  function start() {
    $("login-form").addEventListener("submit", function (event) {
      event.preventDefault();
      var value = $("token").value.trim();
      $("token").value = "";
      if (value) { storeToken(value); poll(); }
    });
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
